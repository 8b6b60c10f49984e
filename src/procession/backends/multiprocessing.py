"""The ``multiprocessing`` backend: stdlib multiprocessing, made crash-safe.

Workers are plain :class:`multiprocessing.Process` objects from an explicit
context (``start_method``; the global default is never touched), each with
its own duplex :func:`Pipe`, and tasks travel as opaque bytes.  Pickle is the
default serializer, as with the standard library.

Why not :class:`multiprocessing.Pool`?  Its workers share one task queue and
one result queue, each guarded by a lock.  A worker killed while it holds one
of those locks (reading its next task, writing a result) deadlocks every other
worker, and a worker killed mid-task loses its task without a trace, so
``Pool.map`` waits forever.  Nothing outside the pool can tell which task the
dead worker was running.  One pipe per worker removes both problems: a worker
owns no shared lock, and the parent always knows what each worker is doing.

    caller threads            dispatcher thread                     workers
    ──────────────            ─────────────────                     ───────
    submit(task) ─► queue ─► idle worker? send ───────pipe────────► run_task(task)
                             wait(pipes, sentinels, wake-up) ◄─pipe─ b"R" + result
    TaskFuture ◄─ set_result ─┘   │
                                  └ a sentinel fired: that worker died
                                    → fail ITS task only (WorkerCrashedError
                                      naming the signal), start a replacement

Guarantees:

- One task per worker at a time, so a dead worker loses exactly the task it was
  running; the other tasks are neither lost nor run twice.
- :meth:`kill_task` kills the worker running a task and replaces it (this is
  how ``timeout=`` works); ``shutdown(kill=True)`` returns within seconds even
  while a task hangs.
- No worker outlives the parent: every worker is started by the dispatcher
  thread, asks the kernel for ``SIGKILL`` when its parent goes
  (``PR_SET_PDEATHSIG`` on Linux; under forkserver the parent is the fork
  server, which itself exits when this process dies), and a watcher thread in
  the worker exits as soon as its lifeline pipe (whose write end only the
  parent holds) reports end-of-file or the parent pid changes.
- Workers ignore SIGINT: Ctrl-C belongs to the parent, whose scheduler then
  kills the pool.
- An initializer that raises is reported once, with its traceback, on the
  first task; the pool then refuses work instead of respawning forever.
- Output is not lost: a worker's stdout/stderr lines and ``logging`` records
  travel over its pipe to the parent's streams and loggers (``forward_output``).

The default start method is ``forkserver`` where it exists (the standard
library's default from Python 3.14: safe while the parent runs threads, which
this backend always does), else ``spawn``.  As with the standard library, a
script's ``__main__`` is imported in the workers under ``spawn`` and
``forkserver``, so guard it with ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, ClassVar

from procession import worker as runtime
from procession.backends.base import Backend, Capabilities, TaskFuture
from procession.errors import RemoteTraceback, WorkerCrashedError

__all__ = ["MultiprocessingBackend", "describe_exit"]

# Worker -> parent messages start with one of these bytes.
RESULT, READY, INIT_FAILED = b"R", b"S", b"I"
STDOUT, STDERR, LOG = b"O", b"E", b"L"
# Parent -> worker: an empty message asks the worker to exit.
QUIT = b""

KILL_GRACE_SECONDS = 1.0
# Workers that die before they are ready this many times in a row break the pool
# (a script without a __main__ guard, an initializer calling os._exit, ...).
MAX_STARTUP_FAILURES = 3
RETIRE_SECONDS = 5.0
_PR_SET_PDEATHSIG = 1


def default_start_method() -> str:
    """``forkserver`` where the platform has it, else ``spawn``."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


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


# -- the worker side ----------------------------------------------------------------


def die_with_parent() -> None:
    """Make this worker process exit when its parent dies, however it dies."""
    if sys.platform == "linux":
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _watch_lifeline(lifeline: Connection | None, parent: int) -> None:
    while True:
        try:
            if lifeline is None:
                threading.Event().wait(0.5)
            elif lifeline.poll(0.5):
                lifeline.recv_bytes()  # only EOFError is expected: the parent never writes
        except (EOFError, OSError):
            os._exit(70)
        if os.getppid() != parent:
            os._exit(70)


def watch_parent(lifeline: Connection | None = None) -> None:
    """Start a daemon thread that ends this process once the parent is gone."""
    threading.Thread(
        target=_watch_lifeline,
        args=(lifeline, os.getppid()),
        name="procession-lifeline",
        daemon=True,
    ).start()


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
    """Route this worker's stdout, stderr and logging through ``send``."""
    streams = [_LineForwarder(send, STDOUT), _LineForwarder(send, STDERR)]
    sys.stdout, sys.stderr = streams
    root = logging.getLogger()
    root.handlers[:] = [_LogForwarder(send)]
    root.setLevel(log_level)
    return streams


def deliver_output(kind: bytes, payload: bytes, pid: int) -> None:
    """In the parent: hand a worker's output line or log record to our streams/loggers."""
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


def _worker_main(
    conn: Connection, lifeline: Connection, setup: bytes | None, log_level: int | None
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    watch_parent(lifeline)
    lock = threading.Lock()  # a task's own threads may print too

    def send(message: bytes) -> None:
        with lock:
            conn.send_bytes(message)

    streams = install_forwarders(send, log_level) if log_level is not None else []
    try:
        runtime.initialize_worker(setup)
    except BaseException as exc:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        name = f"{type(exc).__module__}.{type(exc).__qualname__}"
        with contextlib.suppress(Exception):
            send(INIT_FAILED + pickle.dumps((name, str(exc), text), 5))
        return
    send(READY)
    recv, run = conn.recv_bytes, runtime.run_task
    while True:
        try:
            task = recv()
        except (EOFError, OSError):
            return
        if task == QUIT:
            return
        result = run(task)
        for stream in streams:
            stream.flush()  # a task's last printed line arrives before its result
        send(RESULT + result)


# -- the parent side ----------------------------------------------------------------


@dataclass(eq=False)
class _Worker:
    process: Any
    pid: int
    conn: Connection
    lifeline: Connection
    task: TaskFuture | None = None
    tasks_done: int = 0
    retiring: bool = False  # asked to quit; not replaced when it exits
    killed: bool = False  # killed by kill_task; replaced when it exits
    ready: bool = False  # initialized and reading tasks


_live_pools: weakref.WeakSet[MultiprocessingBackend] = weakref.WeakSet()


def _stop_all_pools() -> None:
    for pool in list(_live_pools):
        pool.shutdown(wait=False, kill=True)


# Registered after multiprocessing's own exit hook, so it runs before it (LIFO):
# multiprocessing joins non-daemonic children at exit, which would wait forever
# for a worker stuck in a task.
atexit.register(_stop_all_pools)


class MultiprocessingBackend(Backend):
    """Stdlib multiprocessing workers that never hang on a crash (pickle by default).

    Options: ``workers``, ``worker_setup`` (initializer bytes), ``start_method``
    (``"forkserver"``, ``"spawn"`` or ``"fork"``; default forkserver where it
    exists), ``max_tasks_per_worker`` (replace a worker after that many tasks),
    ``forward_output`` (default True: workers' ``print``/stdout/stderr lines go to
    the parent's current streams and their ``logging`` records to the parent's
    loggers, tagged ``procession_worker`` with the worker pid).

    Example::

        backend = procession.create_backend(
            "multiprocessing", workers=4, start_method="spawn", max_tasks_per_worker=100
        )
        results = list(procession.map(abs, range(-5, 5), backend=backend))
        backend.shutdown()
    """

    name: ClassVar[str] = "multiprocessing"
    capabilities = Capabilities(isolated=True, kill=True, crash_detection=True)
    default_serializer: ClassVar[str] = "pickle"

    def __init__(
        self,
        *,
        workers: int | None = None,
        worker_setup: bytes | None = None,
        start_method: str | None = None,
        max_tasks_per_worker: int | None = None,
        forward_output: bool = True,
    ) -> None:
        super().__init__(workers=workers, worker_setup=worker_setup)
        methods = multiprocessing.get_all_start_methods()
        method = default_start_method() if start_method is None else start_method
        if method not in methods:
            raise ValueError(
                f"start_method={method!r} is not available here; choose one of {', '.join(methods)}"
            )
        if max_tasks_per_worker is not None and (
            isinstance(max_tasks_per_worker, bool)
            or not isinstance(max_tasks_per_worker, int)
            or max_tasks_per_worker <= 0
        ):
            raise ValueError(
                f"max_tasks_per_worker must be a positive int or None, got {max_tasks_per_worker!r}"
            )
        self.start_method = method
        self.max_tasks_per_worker = max_tasks_per_worker
        self.forward_output = forward_output
        self._context: Any = multiprocessing.get_context(method)
        self._lock = threading.RLock()
        self._workers: list[_Worker] = []
        self._queue: deque[tuple[TaskFuture, bytes]] = deque()
        self._dispatcher: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._wake_r, self._wake_w = -1, -1
        self._closing = False  # no new work; the dispatcher exits once all is done
        self._stopped = False  # the dispatcher is gone or going; nothing runs any more
        self._broken: BaseException | None = None
        self._startup_failures = 0

    # -- lifecycle ----------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._dispatcher is not None and not self._stopped

    def start(self) -> None:
        with self._lock:
            if self._dispatcher is not None:
                if self._closing or self._stopped:
                    raise RuntimeError(f"{self!r} was shut down; create a new backend")
                return
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_w, False)
            # The dispatcher starts every worker: PR_SET_PDEATHSIG fires when the
            # *thread* that forked a child exits, and this thread lives as long
            # as the pool.
            self._dispatcher = threading.Thread(
                target=self._dispatch_loop, name="procession-multiprocessing", daemon=True
            )
            self._dispatcher.start()
            _live_pools.add(self)
        self._ready.wait()
        if self._start_error is not None:
            raise self._start_error

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        lifeline_r, lifeline_w = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_worker_main,
            args=(
                child_conn,
                lifeline_r,
                self.worker_setup,
                logging.getLogger().getEffectiveLevel() if self.forward_output else None,
            ),
            name="procession-multiprocessing-worker",
            daemon=False,  # a daemonic process may not start children of its own
        )
        try:
            process.start()
        finally:
            child_conn.close()
            lifeline_r.close()
        return _Worker(process, process.pid, parent_conn, lifeline_w)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # -- moving tasks -------------------------------------------------------------

    def submit(self, task: bytes) -> TaskFuture:
        self.start()
        future = TaskFuture()
        with self._lock:
            if self._closing or self._stopped:
                raise RuntimeError(f"{self!r} was shut down; create a new backend")
            broken = self._broken
            if broken is None:
                self._queue.append((future, task))
                self._wake()
        if broken is not None:
            future.set_running_or_notify_cancel()
            future.set_exception(broken)
        return future

    def kill_task(self, future: TaskFuture) -> None:
        with self._lock:
            victim = next((w for w in self._workers if w.task is future), None)
            if victim is None:
                return
            # Neither blame its death on another task nor give it a new one.
            victim.task = None
            victim.killed = True
            pid = victim.pid
            with contextlib.suppress(Exception):
                victim.process.kill()
        _settle(
            future,
            WorkerCrashedError(
                f"worker pid {pid} was killed by SIGKILL on request (kill_task); "
                f"a replacement worker was started",
                exitcode=-signal.SIGKILL,
            ),
        )

    def worker_pids(self) -> set[int]:
        with self._lock:
            return {w.pid for w in self._workers}

    # -- the dispatcher thread ----------------------------------------------------

    def _dispatch_loop(self) -> None:
        try:
            try:
                with self._lock:
                    for _ in range(self.workers):
                        self._workers.append(self._spawn())
            except BaseException as exc:
                self._start_error = exc
                self._stopped = True
                raise
            finally:
                self._ready.set()
            while self._step():
                pass
        except BaseException:
            # A bug here must not leave futures waiting forever.
            self._fail_all(
                WorkerCrashedError(
                    "the multiprocessing pool's dispatcher failed:\n" + traceback.format_exc()
                )
            )
        finally:
            self._teardown()

    def _step(self) -> bool:
        """Wait for one round of events; False when the dispatcher should exit."""
        with self._lock:
            if self._stopped:
                return False
            self._assign()
            busy = any(w.task is not None for w in self._workers)
            if self._closing and not busy and not self._queue:
                return False
            handles: dict[Any, _Worker | None] = {self._wake_r: None}
            for w in self._workers:
                handles[w.conn] = w
                handles[w.process.sentinel] = w
        ready = multiprocessing.connection.wait(list(handles))
        dead: list[_Worker] = []
        for handle in ready:
            owner = handles[handle]
            if owner is None:
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 4096)
            elif handle is owner.conn:
                if not self._receive(owner):
                    dead.append(owner)
            else:
                dead.append(owner)
        for gone in dict.fromkeys(dead):
            self._bury(gone)
        return True

    def _assign(self) -> None:
        """Hand queued tasks to idle workers (lock held)."""
        for w in self._workers:
            # Only a ready worker gets a task: ``timeout=`` counts from here, and a
            # worker still importing must not eat into it.
            while self._queue and w.ready and w.task is None and not (w.retiring or w.killed):
                future, task = self._queue.popleft()
                if not future.set_running_or_notify_cancel():
                    continue  # cancelled while queued
                w.task = future
                future.mark_started(w.pid)
                try:
                    w.conn.send_bytes(task)
                except OSError:
                    pass  # the worker is dying: its sentinel fails the task
            if not self._queue:
                return

    def _receive(self, w: _Worker) -> bool:
        """Read one message from a worker; False when its pipe is closed."""
        try:
            message = w.conn.recv_bytes()
        except (EOFError, OSError):
            return False
        kind, payload = message[:1], message[1:]
        if kind == RESULT:
            with self._lock:
                future, w.task = w.task, None
                w.tasks_done += 1
                if self.max_tasks_per_worker and w.tasks_done >= self.max_tasks_per_worker:
                    w.retiring = True
                    with contextlib.suppress(OSError):
                        w.conn.send_bytes(QUIT)
                    if not (self._closing or self._stopped):
                        self._workers.append(self._spawn())
                self._assign()
            if future is not None:
                _settle(future, result=payload)
        elif kind in (STDOUT, STDERR, LOG):
            deliver_output(kind, payload, w.pid)
        elif kind == READY:
            w.ready = True
            self._startup_failures = 0
        elif kind == INIT_FAILED:
            type_name, text, tb_text = pickle.loads(payload)
            error = WorkerCrashedError(
                f"the worker initializer raised {type_name}: {text}; the pool starts no more "
                f"workers (fix the initializer, then create a new pool)"
            )
            error.__cause__ = RemoteTraceback(tb_text)
            with self._lock:
                self._broken = error
            self._fail_all(error)
        return True

    def _bury(self, w: _Worker) -> None:
        """A worker exited: fail its task, replace it, leave the others alone."""
        # A result or an initializer error it sent just before dying still counts.
        with contextlib.suppress(Exception):
            while w.conn.poll(0):
                if not self._receive(w):
                    break
        w.process.join(KILL_GRACE_SECONDS)
        exitcode = w.process.exitcode
        if not (w.ready or w.killed or w.retiring or self._stopped or self._broken):
            self._startup_failures += 1
            if self._startup_failures >= MAX_STARTUP_FAILURES:
                self._break_on_startup(w, exitcode)
        with self._lock:
            if w in self._workers:
                self._workers.remove(w)
            future, w.task = w.task, None
            if not (w.retiring or self._closing or self._stopped or self._broken):
                self._workers.append(self._spawn())
        _close_worker(w)
        if future is not None:
            _settle(
                future,
                WorkerCrashedError(
                    f"{describe_exit(w.pid, exitcode)} while running a task",
                    exitcode=exitcode,
                ),
            )

    def _break_on_startup(self, w: _Worker, exitcode: int | None) -> None:
        hint = (
            f" (under start_method={self.start_method!r} every worker imports the main "
            f"script: a script must keep its code under 'if __name__ == \"__main__\":'; "
            f"a worker's own error is printed on stderr)"
            if self.start_method != "fork"
            else ""
        )
        error = WorkerCrashedError(
            f"{MAX_STARTUP_FAILURES} workers in a row died while starting, the last one "
            f"pid {w.pid} {exit_reason(exitcode)}{hint}; "
            f"the pool starts no more workers",
            exitcode=exitcode,
        )
        with self._lock:
            self._broken = error
        self._fail_all(error)

    def _fail_all(self, error: BaseException) -> None:
        """Fail every queued and running task with ``error``."""
        with self._lock:
            futures = [future for future, _ in self._queue]
            self._queue.clear()
            for w in self._workers:
                if w.task is not None:
                    futures.append(w.task)
                    w.task = None
        for future in futures:
            _settle(future, error)

    def _teardown(self) -> None:
        """Stop every worker (the dispatcher's last act; it alone closes pipes)."""
        with self._lock:
            self._stopped = True
            workers, self._workers = self._workers, []
        for w in workers:
            if not w.retiring:
                with contextlib.suppress(OSError):
                    w.conn.send_bytes(QUIT)
        for w in workers:
            w.process.join(RETIRE_SECONDS)
            if w.process.exitcode is None:
                w.process.kill()
                w.process.join(KILL_GRACE_SECONDS)
            _close_worker(w)
        self._fail_all(WorkerCrashedError("the multiprocessing pool was shut down"))
        with self._lock:
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        _live_pools.discard(self)

    # -- shutting down ------------------------------------------------------------

    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        with self._lock:
            dispatcher = self._dispatcher
            if dispatcher is None:
                self._stopped = True
                return
            self._closing = True
            if kill:
                workers = list(self._workers)
        if kill:
            # Fail the futures before the dispatcher can tear down (and forget) the
            # workers that hold them.
            self._fail_all(
                WorkerCrashedError("the multiprocessing pool was killed before this task finished")
            )
            with self._lock:
                self._stopped = True
        with self._lock:
            self._wake()
        if kill:
            # Killing is safe from any thread; closing pipes is left to the dispatcher.
            for w in workers:
                with contextlib.suppress(Exception):
                    w.process.kill()
        if dispatcher is threading.current_thread():
            return  # called from a future's callback: the loop exits on its own
        if kill:
            dispatcher.join(RETIRE_SECONDS)
        elif wait:
            dispatcher.join()


def _settle(
    future: TaskFuture, error: BaseException | None = None, *, result: bytes | None = None
) -> None:
    """Resolve ``future`` unless it is already resolved (or was cancelled)."""
    if future.done():
        return
    with contextlib.suppress(Exception):  # resolved concurrently: the first answer stands
        if future.running() or future.set_running_or_notify_cancel():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]


def _close_worker(w: _Worker) -> None:
    for conn in (w.conn, w.lifeline):
        with contextlib.suppress(Exception):
            conn.close()
    with contextlib.suppress(Exception):
        w.process.close()
