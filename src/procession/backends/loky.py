"""The ``loky`` backend: loky's robust process pool (cloudpickle by default).

loky is imported lazily; without it, :meth:`LokyBackend.check_available`
raises :class:`BackendUnavailableError` naming ``pip install 'procession[loky]'``.
This backend runs a private ``loky.ProcessPoolExecutor`` (never the reusable
executor joblib shares) and adds the guarantees loky lacks:

    caller threads        dispatcher thread                  loky executor (generation N)
    ──────────────        ─────────────────                  ────────────────────────────
    submit(task) ─► queue ─► at most 2 x workers in flight ──► _run_task(task_id, log, task)
                             (start log read: ``timeout=``         │ appends "task_id pid"
                             counts from the real start)           ▼ to the start log
    TaskFuture ◄─ done-callback ◄──────────────────────────── result bytes
                  TerminatedWorkerError: the executor is broken ─► classify, requeue, new executor

loky has no way to stop one task or to lose one worker: when a worker dies it
marks the whole executor broken, fails every pending future with
``TerminatedWorkerError`` and kills the other workers.  So:

- **Crash attribution.**  Each task appends ``task_id pid`` to a small start
  log as it begins.  When the executor breaks, the done-callbacks run before
  loky kills the survivors, so the tasks whose worker pid is already dead are
  the ones that crashed: they fail with :class:`WorkerCrashedError` naming the
  exit code or signal loky reported.  If no dead worker can be matched, every
  task that had started is failed as crashed (so a poisonous item can never
  loop forever).
- **Bystanders are re-run.**  Every other task that was in flight on the broken
  executor is put back at the head of the queue, in order, and sent to a fresh
  executor: none is lost and none is reported twice.  Those still waiting in
  loky's queue simply run later; but the ones that were already running on
  another worker (at most ``workers - 1``) execute a second time from the
  start, so their side effects may happen twice.  Use the ``process`` or
  ``multiprocessing`` backends when that matters; they lose only the dead
  worker's task.
- **kill_task** (``timeout=``) kills the whole executor the same way (loky offers
  nothing finer), fails the timed-out task, and re-runs the bystanders.
- ``shutdown(kill=True)`` kills the workers at once, even while a task hangs.
- Workers ignore SIGINT and die with the parent (``PR_SET_PDEATHSIG`` on Linux
  plus a thread watching the parent pid); an initializer that raises is
  reported with its traceback on the first task, without respawning.
- Output is not lost: each worker connects to a Unix socket of the parent and
  sends its stdout/stderr lines and ``logging`` records there; a thread in the
  parent hands them to the parent's current streams and loggers.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import pickle
import re
import selectors
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import traceback
import weakref
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, ClassVar

from procession import worker as runtime
from procession.backends._resources import (
    ResourceControl,
    ThreadsOption,
    WorkerSettings,
    apply_in_worker,
)
from procession.backends._worker_process import (
    deliver_output,
    describe_exit,
    die_with_parent,
    exit_reason,
    install_forwarders,
    kill_process_group,
    lead_process_group,
    watch_parent,
)
from procession.backends.base import Backend, Capabilities, TaskFuture
from procession.errors import BackendUnavailableError, WorkerCrashedError

__all__ = ["LokyBackend"]

INSTALL_HINT = "pip install 'procession[loky]'"
RESULT, INIT_FAILED, HELLO = b"R", b"I", b"H"
_FRAME = struct.Struct("!I")
KILL_GRACE_SECONDS = 5.0
# Executors that break this many times in a row before any task starts break the
# pool (workers that cannot even start: loky would be respawned forever).
MAX_STARTUP_BREAKS = 3
# Start-log lines with this task id say that a worker finished starting.
READY_TASK_ID = 0

# -- the worker side ----------------------------------------------------------------

_init_failure: bytes | None = None
_log_fds: dict[str, int] = {}


_streams: list[Any] = []


def _init_worker(
    setup: bytes | None,
    output_address: str | None = None,
    log_level: int = logging.WARNING,
    resources: WorkerSettings | None = None,
    start_log: str | None = None,
) -> None:
    """loky's initializer: never raises (loky would respawn the worker forever)."""
    global _init_failure
    apply_in_worker(resources)  # env= and thread caps, before anything else runs
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lead_process_group()
    die_with_parent()
    # Our private folder goes with us if the parent is killed (SIGKILL, SIGTERM).
    watch_parent(leftovers=() if start_log is None else (os.path.dirname(start_log),))
    if output_address is not None:
        try:
            # loky enables faulthandler on sys.stderr after this initializer; do it
            # now, while sys.stderr is still the real one with a file descriptor.
            if not faulthandler.is_enabled():
                faulthandler.enable()
            _connect_output(output_address, log_level)
        except (OSError, ValueError, AttributeError):
            pass  # no forwarding: output goes to the inherited stdout/stderr
    try:
        runtime.initialize_worker(setup)
    except BaseException as exc:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        name = f"{type(exc).__module__}.{type(exc).__qualname__}"
        _init_failure = INIT_FAILED + pickle.dumps((name, str(exc), text), 5)
    if start_log is not None:
        # "0 pid": this worker finished starting.  Workers that die after this are
        # not a pool that cannot start, however few tasks they ran.
        with contextlib.suppress(OSError):
            _log_line(start_log, f"{READY_TASK_ID} {os.getpid()}\n")


def _log_line(start_log: str, line: str) -> None:
    fd = _log_fds.get(start_log)
    if fd is None:
        fd = _log_fds[start_log] = os.open(start_log, os.O_WRONLY | os.O_APPEND)
    # One small O_APPEND write is atomic: lines from several workers never mix.
    os.write(fd, line.encode())


def _connect_output(address: str, log_level: int) -> None:
    """Send this worker's stdout/stderr lines and log records to the parent's socket."""
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    channel.connect(address)
    lock = threading.Lock()

    def send(message: bytes) -> None:
        with lock, contextlib.suppress(OSError):  # the parent is gone: so are we, soon
            channel.sendall(_FRAME.pack(len(message)) + message)

    send(HELLO + str(os.getpid()).encode())
    _streams[:] = install_forwarders(send, log_level)


def _run_task(task_id: int, start_log: str, task: bytes) -> bytes:
    """Record which process runs ``task_id``, then run it."""
    _log_line(start_log, f"{task_id} {os.getpid()}\n")
    if _init_failure is not None:
        return _init_failure
    result = runtime.run_task(task)
    for stream in _streams:
        stream.flush()
    return RESULT + result


_DIRECTORY_PREFIX = "procession-loky-"


def _private_directory() -> str:
    """A fresh 0700 directory for a pool's start log and output socket.

    Its name carries our pid, so the directories of parents that died without
    cleaning up (SIGKILL) are found and removed here, by the next pool.
    """
    parent = tempfile.gettempdir()
    try:
        names = os.listdir(parent)
    except OSError:
        names = []
    me = getattr(os, "getuid", lambda: None)()
    for name in names:
        owner_pid = name[len(_DIRECTORY_PREFIX) :].partition("-")[0]
        if not (name.startswith(_DIRECTORY_PREFIX) and owner_pid.isdigit()):
            continue
        path = os.path.join(parent, name)
        with contextlib.suppress(OSError):
            if _pid_is_dead(int(owner_pid)) and os.stat(path).st_uid == me:
                shutil.rmtree(path, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{_DIRECTORY_PREFIX}{os.getpid()}-")


class _OutputReceiver:
    """In the parent: a Unix socket the workers connect to, and a thread that
    hands their output lines and log records to our streams and loggers."""

    def __init__(self, directory: str) -> None:
        self.address = os.path.join(directory, "output")
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.address)
        self._server.listen(64)
        self._server.setblocking(False)
        self._wake_r, self._wake_w = os.pipe()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._server, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._peers: dict[socket.socket, tuple[bytearray, list[int]]] = {}
        self._thread = threading.Thread(
            target=self._loop, name="procession-loky-output", daemon=True
        )
        self._thread.start()

    def _loop(self) -> None:
        try:
            while True:
                for key, _ in self._selector.select():
                    if key.fileobj == self._wake_r:
                        return
                    if key.fileobj is self._server:
                        with contextlib.suppress(OSError):
                            peer, _ = self._server.accept()
                            peer.setblocking(True)
                            self._peers[peer] = (bytearray(), [0])
                            self._selector.register(peer, selectors.EVENT_READ)
                    else:
                        self._read(key.fileobj)  # type: ignore[arg-type]
        finally:
            for peer in list(self._peers):
                self._drop(peer)
            self._selector.close()
            self._server.close()
            os.close(self._wake_r)
            with contextlib.suppress(OSError):
                os.unlink(self.address)

    def _read(self, peer: socket.socket) -> None:
        try:
            data = peer.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._drop(peer)
            return
        buffer, pid = self._peers[peer]
        buffer += data
        while len(buffer) >= _FRAME.size:
            (size,) = _FRAME.unpack_from(buffer)
            if len(buffer) < _FRAME.size + size:
                break
            message = bytes(buffer[_FRAME.size : _FRAME.size + size])
            del buffer[: _FRAME.size + size]
            kind, payload = message[:1], message[1:]
            if kind == HELLO:
                pid[0] = int(payload)
            else:
                deliver_output(kind, payload, pid[0])

    def _drop(self, peer: socket.socket) -> None:
        self._peers.pop(peer, None)
        with contextlib.suppress(Exception):
            self._selector.unregister(peer)
        peer.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not threading.current_thread():
            self._thread.join(KILL_GRACE_SECONDS)
        os.close(self._wake_w)


# -- the parent side ----------------------------------------------------------------


def _pid_is_dead(pid: int) -> bool:
    if sys.platform == "linux":
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                state = stat.read().rpartition(b")")[2].split()[0]
        except (OSError, IndexError):
            return True
        return state in (b"Z", b"X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _exitcodes_text(error: BaseException) -> str:
    _, _, tail = str(error).partition("exit codes of the workers are")
    return f"died with exit codes {tail.split('}')[0].strip()}}}" if tail else "died"


def _exitcode_from(error: BaseException) -> int | None:
    """The single exit code in loky's "The exit codes of the workers are {SIGKILL(-9)}"."""
    _, _, tail = str(error).partition("exit codes of the workers are")
    codes = {int(code) for code in re.findall(r"\((-?\d+)\)", tail.split("}")[0])}
    return codes.pop() if len(codes) == 1 else None


@dataclass(eq=False)
class _Generation:
    """One loky executor; replaced whenever loky breaks it or we kill it."""

    executor: Any
    number: int
    retired: bool = False
    ready: bool = False  # a worker of this executor finished starting
    accepted: int = 0  # tasks loky took; a fresh executor refusing work is not transient
    records: set[_Record] = field(default_factory=set)


@dataclass(eq=False)
class _Record:
    future: TaskFuture
    task: bytes = field(repr=False)
    task_id: int = 0
    generation: _Generation | None = None
    handled: bool = False
    pid: int | None = None  # the worker running it, once its start line was seen
    loky_future: Future[bytes] | None = None


_live_pools: weakref.WeakSet[LokyBackend] = weakref.WeakSet()
_exit_hook_registered = False


def _stop_all_pools() -> None:
    from procession.pools import drain_accepted_work

    # Work an Executor accepted runs to completion first (concurrent.futures semantics).
    drain_accepted_work()
    for pool in list(_live_pools):
        pool.shutdown(wait=False, kill=True)


def _register_exit_hook() -> None:
    """Kill our pools before loky's own exit hook waits for their (maybe hung) tasks.

    loky joins its executors from a ``threading`` exit hook, which runs before
    ``atexit`` handlers; hooks run last-registered first, so register after loky.
    """
    global _exit_hook_registered
    if _exit_hook_registered:
        return
    register = getattr(threading, "_register_atexit", None)
    with contextlib.suppress(RuntimeError):
        if register is not None:
            register(_stop_all_pools)
        else:  # pragma: no cover - every supported CPython has it
            import atexit

            atexit.register(_stop_all_pools)
        _exit_hook_registered = True


def _track_folder(path: str, *, register: bool) -> None:
    """Hand our private folder to loky's resource tracker, which outlives us.

    If this process is killed (SIGKILL, or SIGTERM without a handler) no clean-up
    code runs here; the tracker notices and removes the folder (and loky's
    semaphores), as it does for joblib's memmapping folders.
    """
    with contextlib.suppress(Exception):
        from loky.backend import resource_tracker

        if register:
            resource_tracker.register(path, "folder")
        else:
            resource_tracker.unregister(path, "folder")


def _rearm_exit_hook() -> None:
    """Register our exit hook again, after the one loky registers for each new executor.

    loky (3.4) registers its ``_python_exit`` for every executor whose manager
    thread starts (``threading._register_atexit`` returns None, so its "already
    registered" check never holds); hooks run last-registered first.
    """
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        with contextlib.suppress(RuntimeError):  # the interpreter is exiting already
            register(_stop_all_pools)


def _no_op() -> None:
    """The warm-up task: starts an executor's manager thread and workers."""


class LokyBackend(Backend):
    """A loky process pool with crash attribution, kill and healing (cloudpickle).

    Options: ``workers``, ``worker_setup`` (initializer bytes), ``start_method``
    (loky context name: ``"loky"`` (default), ``"loky_init_main"``, ``"spawn"``
    or ``"forkserver"``), ``forward_output`` (default True: workers'
    stdout/stderr lines and ``logging`` records reach the parent's streams and
    loggers, tagged ``procession_worker`` with the worker pid), and the
    resource options ``memory_limit``, ``threads_per_worker``, ``env``
    (docs/resources.md).

    Example::

        backend = procession.create_backend("loky", workers=4)
        results = list(procession.map(lambda x: x + 1, range(10), backend=backend))
        backend.shutdown()
    """

    name: ClassVar[str] = "loky"
    capabilities = Capabilities(
        isolated=True,
        kill=True,
        crash_detection=True,
        memory_limit=True,
        threads_per_worker=True,
        env=True,
    )
    default_serializer: ClassVar[str] = "cloudpickle"

    def __init__(
        self,
        *,
        workers: int | None = None,
        worker_setup: bytes | None = None,
        start_method: str | None = None,
        forward_output: bool = True,
        memory_limit: int | str | None = None,
        threads_per_worker: ThreadsOption = "auto",
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(workers=workers, worker_setup=worker_setup)
        # Resource options: validated here, applied by the workers and the watcher.
        self.resources = ResourceControl.resolve(
            workers=self.workers,
            memory_limit=memory_limit,
            threads_per_worker=threads_per_worker,
            env=env,
        )
        methods = ("loky", "loky_init_main", "spawn", "forkserver")
        method = "loky" if start_method is None else start_method
        if method not in methods:
            raise ValueError(
                f"start_method={method!r} is not a loky context; choose one of {', '.join(methods)}"
            )
        self.start_method = method
        self.forward_output = forward_output
        self._output: _OutputReceiver | None = None
        # One task running and one waiting per worker: no worker idles while a
        # result travels back, and ``timeout=`` still counts from the real start.
        self._max_in_flight = 2 * self.workers
        self._lock = threading.RLock()
        self._wakeup = threading.Condition(self._lock)
        self._queue: deque[_Record] = deque()
        self._generation: _Generation | None = None
        self._generations = 0
        self._task_ids = 0
        self._in_flight = 0
        self._retired: list[Any] = []  # broken or killed executors to join
        self._dispatcher: threading.Thread | None = None
        self._directory = ""
        self._start_log = ""
        self._log_offset = 0
        self._by_id: dict[int, _Record] = {}  # in flight, by task id
        self._closing = False
        self._stopped = False
        self._killed = False
        self._broken: BaseException | None = None
        self._startup_breaks = 0
        self._warmed = threading.Event()

    @classmethod
    def check_available(cls) -> None:
        try:
            import loky  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailableError(
                f"the 'loky' backend needs the loky package ({exc}); install it with: "
                f"{INSTALL_HINT}"
            ) from exc

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
            self.check_available()
            # Now, in the caller's thread: once the interpreter is exiting it is too late.
            _register_exit_hook()
            self._directory = _private_directory()
            _track_folder(self._directory, register=True)
            self._start_log = os.path.join(self._directory, "started")
            open(self._start_log, "wb").close()
            if self.forward_output:
                self._output = _OutputReceiver(self._directory)
            # Every loky executor is created, and so every worker forked, by this
            # thread: PR_SET_PDEATHSIG fires when the forking *thread* ends.
            self._dispatcher = threading.Thread(
                target=self._dispatch_loop, name="procession-loky", daemon=True
            )
            self._warmed = threading.Event()
            self._dispatcher.start()
            _live_pools.add(self)
            self.resources.watch(self)  # memory_limit=, and what a SIGKILL was about
        # Wait until the first executor runs (see _warm_up): from then on our exit
        # hook is registered after loky's, so it runs first.
        self._warmed.wait(KILL_GRACE_SECONDS * 6)

    def _new_executor(self) -> _Generation:
        import loky
        from loky.backend import get_context

        executor = loky.ProcessPoolExecutor(
            max_workers=self.workers,
            context=get_context(self.start_method),
            initializer=_init_worker,
            initargs=(
                self.worker_setup,
                None if self._output is None else self._output.address,
                logging.getLogger().getEffectiveLevel(),
                self.resources.worker_settings(),
                self._start_log,
            ),
        )
        self._generations += 1
        return _Generation(executor, self._generations)

    # -- moving tasks -------------------------------------------------------------

    def submit(self, task: bytes) -> TaskFuture:
        self.start()
        future = TaskFuture()
        with self._lock:
            if self._closing or self._stopped:
                raise RuntimeError(f"{self!r} was shut down; create a new backend")
            broken = self._broken
            if broken is None:
                self._queue.append(_Record(future, task))
                self._wakeup.notify()
        if broken is not None:
            _settle(future, broken)
        else:
            future.add_done_callback(self._on_future_done)
        return future

    def _on_future_done(self, future: Future[bytes]) -> None:
        """A task not yet started was cancelled: take it back from loky's queue too.

        A queued record is skipped by the dispatcher; one handed to loky but not
        yet running there is cancelled in loky (if loky already moved it to a
        worker it runs, and its result is dropped).
        """
        if not future.cancelled():
            return
        with self._lock:
            generation = self._generation
            records = list(generation.records) if generation is not None else []
        for record in records:
            if record.future is future and record.loky_future is not None:
                record.loky_future.cancel()

    def worker_pids(self) -> set[int]:
        with self._lock:
            generation = self._generation
            if generation is None:
                return set()
            # loky keeps no public list of its workers.
            processes = getattr(generation.executor, "_processes", None) or {}
            return {int(pid) for pid in list(processes)}

    def kill_task(self, future: TaskFuture) -> None:
        with self._lock:
            record = next(
                (r for r in self._all_in_flight() if r.future is future and not r.handled), None
            )
            if record is None or record.generation is None:
                # Re-queued after an earlier kill_task (it had started, so its future
                # cannot be cancelled): stop it here, before it runs again for nobody.
                queued = next((r for r in self._queue if r.future is future), None)
                if queued is None:
                    return
                self._queue.remove(queued)
                generation = None
            else:
                generation = record.generation
                self._requeue_generation(generation, keep=record)
        if generation is not None:
            generation.executor.shutdown(wait=False, kill_workers=True)
        _settle(
            future,
            WorkerCrashedError(
                "the loky worker running this task was killed on request (kill_task); loky "
                "cannot stop one worker, so its executor was replaced and the other running "
                "tasks were re-queued",
                exitcode=-signal.SIGKILL,
            ),
        )

    def _finish(self, record: _Record) -> None:
        """``record`` leaves the in-flight set (lock held)."""
        record.handled = True
        self._in_flight -= 1
        self._by_id.pop(record.task_id, None)
        if record.generation is not None:
            record.generation.records.discard(record)

    def _all_in_flight(self) -> list[_Record]:
        generation = self._generation
        return list(generation.records) if generation is not None else []

    def _requeue_generation(self, generation: _Generation, keep: _Record | None = None) -> None:
        """Retire ``generation``: put its unfinished tasks back at the head of the queue
        (lock held).  ``keep`` is settled by the caller instead."""
        generation.retired = True
        for record in sorted(generation.records, key=lambda r: r.task_id, reverse=True):
            if record.handled:
                continue
            self._finish(record)
            if record is not keep:
                # It starts over: so does its ``timeout=`` clock.
                record.future.started_at = None
                self._queue.appendleft(_Record(record.future, record.task))
        generation.records.clear()
        if self._generation is generation:
            self._generation = None
        self._retired.append(generation.executor)
        self._wakeup.notify()

    # -- the dispatcher thread ----------------------------------------------------

    def _warm_up(self) -> None:
        """Start the first executor now, from the dispatcher thread.

        loky registers its own exit hook (which refuses new tasks from then on)
        each time an executor's manager thread starts; the start() call that
        waits for this returns before the caller's script can end, so the hook
        that drains accepted work is registered after loky's, and runs first.
        """
        try:
            with self._lock:
                if self._generation is None and not self._stopped:
                    self._generation = self._new_executor()
                generation = self._generation
            if generation is not None:
                generation.executor.submit(_no_op)
                generation.accepted = 1
        except Exception:
            pass  # a failing executor is reported by the first real task
        finally:
            _rearm_exit_hook()
            self._warmed.set()

    def _dispatch_loop(self) -> None:
        self._warm_up()
        try:
            while True:
                with self._lock:
                    while not self._stopped and not self._has_work():
                        if self._closing and self._in_flight == 0 and not self._queue:
                            break
                        # While a task is handed over but not yet started, watch
                        # the start log: ``timeout=`` counts from the real start.
                        waiting = any(r.pid is None for r in self._by_id.values())
                        self._wakeup.wait(0.02 if waiting else None)
                        self._scan_start_log()
                    if self._stopped or (
                        self._closing and self._in_flight == 0 and not self._queue
                    ):
                        break
                    retired, self._retired = self._retired, []
                self._join_executors(retired, kill=True)
                self._feed()
        except BaseException:
            self._fail_all(
                WorkerCrashedError(
                    "the loky backend's dispatcher failed:\n" + traceback.format_exc()
                )
            )
        finally:
            self._teardown()

    def _has_work(self) -> bool:
        return bool(self._retired) or bool(
            self._queue and self._in_flight < self._max_in_flight and self._broken is None
        )

    def _feed(self) -> None:
        """Hand queued tasks to loky while fewer than ``workers`` are in flight."""
        while True:
            with self._lock:
                if self._stopped or self._broken is not None:
                    return
                if not self._queue or self._in_flight >= self._max_in_flight:
                    if self._in_flight == 0 and not self._queue and self._log_offset:
                        # Nothing can be writing the start log: keep it small.
                        with contextlib.suppress(OSError):
                            os.truncate(self._start_log, 0)
                            self._log_offset = 0
                    return
                record = self._queue.popleft()
                if record.future.cancelled():
                    continue  # cancelled while queued
                if self._generation is None:
                    try:
                        self._generation = self._new_executor()
                    except Exception as exc:
                        self._queue.appendleft(record)
                        self._broken = exc
                        error: BaseException = exc
                        break
                generation = self._generation
                self._task_ids += 1
                record.task_id = self._task_ids
                record.generation = generation
                generation.records.add(record)
                self._by_id[record.task_id] = record
                self._in_flight += 1
            try:
                loky_future = generation.executor.submit(
                    _run_task, record.task_id, self._start_log, record.task
                )
            except Exception as exc:
                # Broken or shut down between our check and the submit: retire it.
                with self._lock:
                    if not generation.retired:
                        self._requeue_generation(generation)
                    if generation.accepted == 0:
                        # A fresh executor that takes nothing (loky is shutting down
                        # with the interpreter): replacing it would loop forever.
                        self._broken = WorkerCrashedError(
                            f"loky refused a task on a fresh executor ({exc}); the pool "
                            f"runs no more tasks"
                        )
                        self._broken.__cause__ = exc
                        error = self._broken
                        break
                continue
            record.loky_future = loky_future
            generation.accepted += 1
            if generation.accepted == 1:
                _rearm_exit_hook()  # loky registered its hook again for this executor
            loky_future.add_done_callback(lambda done, r=record: self._on_done(r, done))
        self._fail_all(error)  # loky could not start an executor

    def _on_done(self, record: _Record, done: Future[bytes]) -> None:
        """A loky future finished (runs in loky's manager thread)."""
        from loky.process_executor import BrokenProcessPool

        crashed: list[tuple[_Record, WorkerCrashedError]] = []
        outcome: tuple[bytes | None, BaseException | None] | None = None
        with self._lock:
            generation = record.generation
            if record.handled or generation is None:
                return
            error = None if done.cancelled() else done.exception()
            if done.cancelled() and not generation.retired:
                # Cancelled in loky's queue (after our future was cancelled), or by loky.
                self._finish(record)
                self._wakeup.notify()
                error = WorkerCrashedError("loky cancelled this task before it started")
                outcome = (None, error)
            elif isinstance(error, BrokenProcessPool) and not generation.retired:
                crashed = self._classify_break(generation, error)
            elif not generation.retired:
                self._finish(record)
                self._wakeup.notify()
                outcome = (None, error) if error is not None else (done.result(), None)
        for victim, crash in crashed:
            _settle(victim.future, self._broken or crash)
        if self._broken is not None:
            self._fail_all(self._broken)
        if outcome is None:
            return
        payload, error = outcome
        if error is not None:
            _settle(record.future, error)
        elif payload is not None and payload[:1] == INIT_FAILED:
            _settle(record.future, self._break_on_init(payload[1:]))
        elif payload is not None:
            _settle(record.future, result=payload[1:])

    def _classify_break(
        self, generation: _Generation, error: BaseException
    ) -> list[tuple[_Record, WorkerCrashedError]]:
        """loky broke ``generation``: find the tasks whose worker died (lock held).

        Runs before loky kills the surviving workers, so the pids that are gone
        now are the ones that crashed.
        """
        self._scan_start_log()
        unfinished = [r for r in generation.records if not r.handled]
        started = [r for r in unfinished if r.pid is not None]
        dead = [r for r in started if _pid_is_dead(r.pid)]  # type: ignore[arg-type]
        culprits = dead or started
        if started or generation.ready:
            # Workers that started and then died (killed, crashed in a task) heal:
            # the next executor is as good as this one was.
            self._startup_breaks = 0
        else:
            self._startup_breaks += 1
            if self._startup_breaks >= MAX_STARTUP_BREAKS:
                code = _exitcode_from(error)
                how = exit_reason(code) if code is not None else _exitcodes_text(error)
                broken = WorkerCrashedError(
                    f"loky's workers died {self._startup_breaks} times in a row before "
                    f"any of them finished starting, the last time a worker {how}; the "
                    f"pool runs no more tasks (a worker's own error is printed on stderr)",
                    exitcode=code,
                )
                broken.__cause__ = error
                self._broken = broken
                culprits = unfinished
        exitcode = _exitcode_from(error)
        crashed = []
        for record in culprits:
            self._finish(record)
            pid = record.pid
            what = (
                describe_exit(pid, exitcode)
                if exitcode is not None
                else f"worker pid {pid} died (loky reported: {str(error).splitlines()[0]})"
            )
            # WorkerMemoryError when the memory watcher stopped it.
            crash = self.resources.crash_error(
                f"{what} while running a task", pid=pid, exitcode=exitcode
            )
            crash.__cause__ = error
            crashed.append((record, crash))
        self._requeue_generation(generation)
        return crashed

    def _scan_start_log(self) -> None:
        """Read the start lines written since the last scan; mark those tasks started
        (lock held).  A line is written before its task runs, so a scan made after a
        crash sees the crashed task's line."""
        try:
            with open(self._start_log, "rb") as log:
                log.seek(self._log_offset)
                data = log.read()
        except OSError:
            return
        complete = data[: data.rfind(b"\n") + 1]
        self._log_offset += len(complete)
        for line in complete.splitlines():
            task_id, _, pid = line.partition(b" ")
            if int(task_id) == READY_TASK_ID:
                if self._generation is not None:
                    self._generation.ready = True
                continue
            record = self._by_id.get(int(task_id))
            if record is not None and record.pid is None:
                record.pid = int(pid)
                # Running now: from here on cancel() fails, as in concurrent.futures.
                future = record.future
                if future.running() or future.set_running_or_notify_cancel():
                    future.mark_started(record.pid)

    def _break_on_init(self, payload: bytes) -> WorkerCrashedError:
        type_name, text, tb_text = pickle.loads(payload)
        error = WorkerCrashedError.initializer_failed(type_name, text, tb_text)
        with self._lock:
            self._broken = error
            generation = self._generation
            if generation is not None:
                self._requeue_generation(generation)
        self._fail_all(error)
        return error

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            records = list(self._queue)
            self._queue.clear()
            generation = self._generation
            if generation is not None:
                for record in list(generation.records):
                    if not record.handled:
                        self._finish(record)
                        records.append(record)
                generation.records.clear()
        for record in records:
            _settle(record.future, error)

    def _teardown(self) -> None:
        with self._lock:
            self._stopped = True
            executors = list(self._retired)
            self._retired = []
            if self._generation is not None:
                executors.append(self._generation.executor)
                self._generation.retired = True
                self._generation = None
            kill = self._killed or self._broken is not None
        self._fail_all(WorkerCrashedError("the loky pool was shut down"))
        leaders = {int(pid) for ex in executors for pid in list(getattr(ex, "_processes", {}))}
        self._join_executors(executors, kill=kill)
        for leader in leaders:
            kill_process_group(leader)  # what the tasks started dies with the workers
        if self._output is not None:
            self._output.close()
        shutil.rmtree(self._directory, ignore_errors=True)
        _track_folder(self._directory, register=False)
        _live_pools.discard(self)

    @staticmethod
    def _join_executors(executors: list[Any], *, kill: bool) -> None:
        for executor in executors:
            with contextlib.suppress(Exception):
                executor.shutdown(wait=True, kill_workers=kill)

    # -- shutting down ------------------------------------------------------------

    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        with self._lock:
            dispatcher = self._dispatcher
            if dispatcher is None:
                self._stopped = True
                return
            self._closing = True
            generation = self._generation if kill else None
            if kill:
                self._stopped = self._killed = True
            self._wakeup.notify()
        if kill:
            self._fail_all(WorkerCrashedError("the loky pool was killed before this task finished"))
            if generation is not None:
                with contextlib.suppress(Exception):
                    generation.executor.shutdown(wait=False, kill_workers=True)
        if dispatcher is threading.current_thread():
            return
        if kill:
            dispatcher.join(KILL_GRACE_SECONDS)
        elif wait:
            dispatcher.join()


def _settle(
    future: TaskFuture, error: BaseException | None = None, *, result: bytes | None = None
) -> None:
    """Resolve ``future`` unless it is already resolved (first answer wins)."""
    future.settle(result, exc=error)
