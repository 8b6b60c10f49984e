"""What every procession-managed worker *process* shares, whichever pool runs it.

The ``process`` and ``multiprocessing`` pools and the ``loky`` backend start
their workers differently, but inside each worker the same things must hold:
the worker dies with its parent, ignores Ctrl-C, and sends its stdout, stderr
and ``logging`` records to the parent.  This module holds those pieces, and the
parent-side half that hands forwarded output to the parent's own streams and
loggers.

Messages on a worker's pipe start with one byte saying what they carry.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

__all__ = [
    "INIT_FAILED",
    "LOG",
    "QUIT",
    "READY",
    "RESULT",
    "STDERR",
    "STDOUT",
    "deliver_output",
    "describe_exit",
    "die_with_parent",
    "exit_reason",
    "install_forwarders",
    "kill_process_group",
    "lead_process_group",
    "watch_parent",
]

# Worker -> parent messages start with one of these bytes.
RESULT, READY, INIT_FAILED = b"R", b"S", b"I"
STDOUT, STDERR, LOG = b"O", b"E", b"L"
# Parent -> worker: an empty message asks the worker to exit.
QUIT = b""

_PR_SET_PDEATHSIG = 1


def exit_reason(exitcode: int | None) -> str:
    """``"was killed by SIGKILL (exit code -9)"``, ``"exited with code 3"`` and the like."""
    if exitcode is None:
        return "stopped responding"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name} (exit code {exitcode})"
    return f"exited with code {exitcode}"


def describe_exit(pid: int | None, exitcode: int | None) -> str:
    """``"worker pid 123 was killed by SIGKILL (exit code -9)"`` and the like."""
    return f"worker pid {pid} {exit_reason(exitcode)}"


# -- in the worker ------------------------------------------------------------------


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux).

    Only safe where the parent is single-threaded or outlives every worker it
    starts (the forkserver): the signal fires when the *thread* that forked exits.
    """
    if sys.platform == "linux":
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _orphaned(leftovers: tuple[str, ...]) -> None:
    """The parent died without cleaning up (SIGKILL, SIGTERM): do it for it, then exit."""
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    if hasattr(os, "killpg") and os.getpgid(0) == os.getpid():
        # We lead our group: what our tasks started goes with us (we included).
        with contextlib.suppress(OSError):
            os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(70)


def _watch_lifeline(lifeline: Connection | None, parent: int, leftovers: tuple[str, ...]) -> None:
    while True:
        try:
            if lifeline is None:
                threading.Event().wait(0.5)
            elif lifeline.poll(0.5):
                lifeline.recv_bytes()  # only EOFError is expected: the parent never writes
        except (EOFError, OSError):
            _orphaned(leftovers)
        if os.getppid() != parent:
            _orphaned(leftovers)


def watch_parent(lifeline: Connection | None = None, leftovers: tuple[str, ...] = ()) -> None:
    """Start a daemon thread that ends this process once the parent is gone.

    ``lifeline`` is the read end of a pipe whose write end only the parent
    holds: the kernel closes it when the parent dies, however it dies, and the
    thread exits the process even while the main thread is stuck in a task.
    ``leftovers`` are the parent's temporary directories (multiprocessing's
    ``pymp-*`` listener folder, loky's private folder) that a parent killed
    by SIGKILL or SIGTERM could not remove: the first worker to notice removes them.
    """
    threading.Thread(
        target=_watch_lifeline,
        args=(lifeline, os.getppid(), leftovers),
        name="procession-lifeline",
        daemon=True,
    ).start()


def lead_process_group() -> None:
    """Make this worker the leader of a new process group (POSIX).

    Whatever a task starts with ``subprocess.Popen`` or ``os.fork`` joins the
    group, so the pool can stop it with the worker (:func:`kill_process_group`)
    instead of leaving it orphaned (and holding the forkserver's pipes).
    Ctrl-C is unaffected: workers ignore SIGINT, the parent handles it.
    """
    if hasattr(os, "setpgid"):
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)


def kill_process_group(leader: int | None) -> None:
    """SIGKILL what is left of the process group a worker led (its tasks' children).

    Safe after the worker itself was reaped: a group id is not reused while any
    member of the group lives.
    """
    if leader is None or not hasattr(os, "killpg"):
        return
    try:
        if leader == os.getpgid(0):
            return  # never our own group
        os.killpg(leader, signal.SIGKILL)
    except OSError:
        pass  # no such group: nothing was left


class _LineForwarder(io.TextIOBase):
    """A worker's ``sys.stdout``/``sys.stderr``: complete lines go to the parent."""

    def __init__(self, send: Callable[[bytes], None], kind: bytes) -> None:
        self._send = send
        self._kind = kind
        self._pending = ""

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        if "\n" in self._pending:
            lines, _, self._pending = self._pending.rpartition("\n")
            self._send(self._kind + (lines + "\n").encode("utf-8", "replace"))
        return len(text)

    def flush(self) -> None:
        if self._pending:
            text, self._pending = self._pending, ""
            self._send(self._kind + text.encode("utf-8", "replace"))


_FORMATTER = logging.Formatter()


class _LogForwarder(logging.Handler):
    """Hands every record to the parent, whose own handlers then see it."""

    def __init__(self, send: Callable[[bytes], None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            state = dict(record.__dict__)
            state["msg"], state["args"] = record.getMessage(), None
            if record.exc_info:
                state["exc_text"] = _FORMATTER.formatException(record.exc_info)
            state["exc_info"] = None
            self._send(LOG + pickle.dumps(state, 5))
        except Exception:
            self.handleError(record)


def install_forwarders(send: Callable[[bytes], None], log_level: int) -> list[_LineForwarder]:
    """Route this worker's stdout, stderr and logging through ``send``.

    Returns the two streams: flush them before sending a task's result, so the
    lines a task printed arrive before it.  Output written straight to file
    descriptors 1 and 2 (by C code) is not captured.
    """
    streams = [_LineForwarder(send, STDOUT), _LineForwarder(send, STDERR)]
    sys.stdout, sys.stderr = streams
    root = logging.getLogger()
    root.handlers[:] = [_LogForwarder(send)]
    root.setLevel(log_level)
    return streams


# -- in the parent ------------------------------------------------------------------


def deliver_output(kind: bytes, payload: bytes, pid: int) -> None:
    """Hand a worker's output line or log record to this process's streams/loggers.

    Log records carry the worker's pid as ``record.procession_worker``.
    """
    if kind == LOG:
        record = logging.makeLogRecord(pickle.loads(payload))
        record.procession_worker = pid
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)
        return
    stream = sys.stdout if kind == STDOUT else sys.stderr
    if stream is not None:
        with contextlib.suppress(Exception):
            stream.write(payload.decode("utf-8", "replace"))
            stream.flush()
