"""The ``process`` backend: procession's own pool of worker processes.

The default backend.  Built on the standard library's multiprocessing
primitives with an explicit context (forkserver on Linux, spawn elsewhere:
both safe when the parent runs threads), one duplex pipe per worker, and a
dispatcher thread in the parent that owns every pipe:

    caller threads              dispatcher thread                 worker processes
    ──────────────              ─────────────────                 ────────────────
    submit(task) ──► queue ──► idle worker? send task ──pipe──►  run_task(task)
                                wait(pipes, sentinels) ◄──pipe──  "R" result bytes
    TaskFuture  ◄── set_result ─┘   │  "O"/"E" stdout/stderr lines, "L" log records
                                    │  sentinel fired: the worker died
                                    └► fail its task (WorkerCrashedError naming the
                                       signal), start a replacement, keep the others

Each worker runs exactly one task at a time, so a dead worker loses exactly
the task it was running and nothing else, and :meth:`kill_task` can stop one
task by killing its worker (that is how ``timeout=`` works).

No worker outlives the parent: each watches a lifeline pipe whose write end
only the parent holds (the kernel closes it when the parent dies, however it
dies) and, under forkserver, also gets ``PR_SET_PDEATHSIG``.  Workers ignore
SIGINT: Ctrl-C is the parent's to handle, and the scheduler then kills the pool.

Output is never lost: ``print`` and ``sys.stdout``/``sys.stderr`` writes in a
worker are sent line by line to the parent's current streams, and ``logging``
records are handed to the parent's loggers, tagged with ``procession_worker``
(the worker's pid).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import pickle
import signal
import sys
import threading
import traceback
import types
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, ClassVar

from procession import worker as runtime
from procession.backends._resources import (
    ResourceControl,
    ThreadsOption,
    WorkerSettings,
    apply_in_worker,
)
from procession.backends._worker_process import (
    INIT_FAILED,
    LOG,
    QUIT,
    READY,
    RESULT,
    STDERR,
    STDOUT,
    deliver_output,
    describe_exit,
    die_with_parent,
    install_forwarders,
    kill_process_group,
    lead_process_group,
    watch_parent,
)
from procession.backends.base import Backend, Capabilities, TaskFuture
from procession.errors import WorkerCrashedError

__all__ = ["ProcessBackend"]

KILL_GRACE_SECONDS = 1.0
# Workers that die before they are ready, this many times in a row, stop the
# pool instead of being replaced forever (a broken initializer or environment).
MAX_STARTUP_FAILURES = 3


def default_start_method() -> str:
    """forkserver where it exists (fast, thread-safe), else spawn."""
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


def _worker_main(
    conn: Connection,
    lifeline: Connection,
    setup: bytes | None,
    forward_output: bool,
    log_level: int,
    death_signal: bool,
    resources: WorkerSettings | None = None,
    leftovers: tuple[str, ...] = (),
) -> None:
    apply_in_worker(resources)  # env= and thread caps, before anything else runs
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lead_process_group()
    if death_signal:
        die_with_parent()
    watch_parent(lifeline, leftovers)
    send_lock = threading.Lock()  # a task's own threads may print too

    def send(message: bytes) -> None:
        with send_lock:
            conn.send_bytes(message)

    streams = install_forwarders(send, log_level) if forward_output else []
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
            stream.flush()  # lines printed by a task arrive before its result
        send(RESULT + result)


# -- the parent side --------------------------------------------------------------

_main_swap_lock = threading.Lock()


@contextlib.contextmanager
def _children_skip_main() -> Iterator[None]:
    """Start spawn/forkserver children without re-running the parent's ``__main__``.

    multiprocessing normally re-imports the main script in every child, which is
    why scripts need an ``if __name__ == "__main__"`` guard.  Our workers never
    need it (cloudpickle sends functions and classes from ``__main__`` by
    value), so while a child starts, ``sys.modules["__main__"]`` is a copy of
    the real one without ``__file__``/``__spec__``: the same objects by name,
    nothing for the child to re-run.
    """
    real = sys.modules.get("__main__")
    if real is None or (
        getattr(real, "__spec__", None) is None and getattr(real, "__file__", None) is None
    ):
        yield
        return
    stand_in = types.ModuleType("__main__")
    stand_in.__dict__.update(real.__dict__)
    stand_in.__dict__.pop("__file__", None)
    stand_in.__spec__ = None
    with _main_swap_lock:
        sys.modules["__main__"] = stand_in
        try:
            yield
        finally:
            sys.modules["__main__"] = real


@dataclass(eq=False)
class _Worker:
    process: Any
    conn: Connection
    lifeline: Connection
    task: TaskFuture | None = None
    tasks_done: int = 0
    retiring: bool = False
    ready: bool = False  # initialized; only ready workers get tasks


@dataclass(eq=False)
class _Queued:
    future: TaskFuture
    task: bytes = field(repr=False)


_live_pools: weakref.WeakSet[ProcessBackend] = weakref.WeakSet()


def _stop_all_pools() -> None:
    from procession.pools import drain_accepted_work

    # Work an Executor accepted runs to completion first (concurrent.futures semantics).
    drain_accepted_work()
    for pool in list(_live_pools):
        pool.shutdown(wait=False, kill=True)


# Registered after multiprocessing.util's own atexit hook, so it runs first
# (LIFO) and the workers are gone before multiprocessing joins its children.
atexit.register(_stop_all_pools)


class ProcessBackend(Backend):
    """procession's own crash-safe, killable process pool (cloudpickle by default).

    Options: ``workers``, ``start_method`` ("forkserver", "spawn" or "fork"),
    ``max_tasks_per_worker`` (replace a worker after that many tasks),
    ``worker_setup`` (initializer bytes), ``forward_output`` (send workers'
    stdout/stderr/logging to the parent; default True), and the resource
    options ``memory_limit``, ``threads_per_worker``, ``env`` (docs/resources.md).

    Example::

        backend = procession.create_backend("process", workers=4, max_tasks_per_worker=100)
    """

    name: ClassVar[str] = "process"
    capabilities = Capabilities(
        isolated=True,
        kill=True,
        crash_detection=True,
        memory_limit=True,
        threads_per_worker=True,
        env=True,
    )
    default_serializer: ClassVar[str] = "cloudpickle"
    #: Whether spawn/forkserver workers re-run the parent's ``__main__`` (the
    #: standard library's behaviour); procession's own workers do not need to.
    children_rerun_main: ClassVar[bool] = False
    #: What to check when workers keep dying before they are ready.
    startup_failure_advice: ClassVar[str] = (
        "Check the initializer and that the worker's imports work"
    )

    def __init__(
        self,
        *,
        workers: int | None = None,
        worker_setup: bytes | None = None,
        start_method: str | None = None,
        max_tasks_per_worker: int | None = None,
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
        method = start_method or default_start_method()
        if method not in multiprocessing.get_all_start_methods():
            raise ValueError(
                f"start_method={method!r} is not available here; choose one of "
                f"{', '.join(multiprocessing.get_all_start_methods())}"
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
        self._queue: deque[_Queued] = deque()
        self._dispatcher: threading.Thread | None = None
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        self._closing = False  # no new work; exit once the queue drains
        self._stopped = False
        self._broken: BaseException | None = None
        self._startup_failures = 0
        self._leftovers: tuple[str, ...] = ()

    # -- lifecycle ------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._dispatcher is not None and not self._stopped

    def start(self) -> None:
        with self._lock:
            if self._dispatcher is not None:
                if self._stopped or self._closing:
                    raise RuntimeError(f"{self!r} was shut down; create a new backend")
                return
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_w, False)
            if self.start_method == "forkserver":
                # The fork server's listener socket lives in this pymp-* folder; if we
                # die by SIGKILL/SIGTERM our workers remove it (no atexit runs then).
                self._leftovers = (multiprocessing.util.get_temp_dir(),)
            for _ in range(self.workers):
                self._workers.append(self._spawn())
            self._dispatcher = threading.Thread(
                target=self._dispatch_loop, name="procession-process-dispatcher", daemon=True
            )
            self._dispatcher.start()
            _live_pools.add(self)
            self.resources.watch(self)  # memory_limit=, and what a SIGKILL was about

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        lifeline_r, lifeline_w = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_worker_main,
            args=(
                child_conn,
                lifeline_r,
                self.worker_setup,
                self.forward_output,
                logging.getLogger().getEffectiveLevel(),
                self.start_method == "forkserver",
                self.resources.worker_settings(),
                self._leftovers,
            ),
            name="procession-worker",
            daemon=False,  # daemonic processes may not start their own children
        )
        if self.start_method == "fork" or self.children_rerun_main:
            process.start()
        else:
            with _children_skip_main():
                process.start()
        child_conn.close()
        lifeline_r.close()
        return _Worker(process, parent_conn, lifeline_w)

    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_w, b"x")

    # -- moving tasks ---------------------------------------------------------

    def submit(self, task: bytes) -> TaskFuture:
        self.start()
        future = TaskFuture()
        with self._lock:
            if self._closing or self._stopped:
                raise RuntimeError(f"{self!r} was shut down; create a new backend")
            if self._broken is not None:
                future.set_exception(self._broken)
                return future
            self._queue.append(_Queued(future, task))
            self._dispatch_idle()
        return future

    def _dispatch_idle(self) -> None:
        """Give queued tasks to idle workers (call with the lock held)."""
        for w in self._workers:
            if not self._queue:
                return
            if w.ready and w.task is None and not w.retiring and w.process.exitcode is None:
                self._send_next(w)

    def _send_next(self, w: _Worker) -> None:
        while self._queue:
            queued = self._queue.popleft()
            if not queued.future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            w.task = queued.future
            queued.future.mark_started(w.process.pid)
            try:
                w.conn.send_bytes(queued.task)
            except (BrokenPipeError, OSError):
                pass  # the worker is dying: its sentinel will fail the task
            return

    def kill_task(self, future: TaskFuture) -> None:
        with self._lock:
            for w in self._workers:
                if w.task is future:
                    with contextlib.suppress(Exception):
                        w.process.kill()
                    return

    def worker_pids(self) -> set[int]:
        with self._lock:
            return {w.process.pid for w in self._workers if w.process.pid is not None}

    # -- the dispatcher thread ------------------------------------------------

    def _dispatch_loop(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._stopped:
                        return
                    if (
                        self._closing
                        and not self._queue
                        and all(w.task is None for w in self._workers)
                    ):
                        self._retire_all()
                        return
                    handles: dict[Any, tuple[str, _Worker | None]] = {self._wake_r: ("wake", None)}
                    for w in self._workers:
                        handles[w.conn] = ("conn", w)
                        handles[w.process.sentinel] = ("sentinel", w)
                ready = multiprocessing.connection.wait(list(handles))
                dead: list[_Worker] = []
                for handle in ready:
                    kind, owner = handles[handle]
                    if kind == "wake":
                        with contextlib.suppress(BlockingIOError, OSError):
                            os.read(self._wake_r, 4096)  # type: ignore[arg-type]
                    elif kind == "conn":
                        assert owner is not None
                        if not self._receive(owner):
                            dead.append(owner)
                    else:
                        assert owner is not None
                        dead.append(owner)
                for corpse in dict.fromkeys(dead):
                    self._bury(corpse)
        except Exception:  # a bug here must not leave futures hanging
            error = WorkerCrashedError(
                "procession's process pool dispatcher failed:\n" + traceback.format_exc()
            )
            self._fail_everything(error)

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
                    self._retire(w)
                    if not self._closing and not self._stopped:
                        self._workers.append(self._spawn())
                    self._dispatch_idle()
                elif not self._stopped:
                    self._send_next(w)
            if future is not None:
                future.settle(payload)
        elif kind == READY:
            with self._lock:
                w.ready = True
                self._startup_failures = 0
                if not self._stopped:
                    self._send_next(w)
        elif kind in (STDOUT, STDERR, LOG):
            deliver_output(kind, payload, w.process.pid)
        elif kind == INIT_FAILED:
            type_name, message_text, tb_text = pickle.loads(payload)
            error = WorkerCrashedError.initializer_failed(type_name, message_text, tb_text)
            with self._lock:
                self._broken = error
            self._fail_everything(error, stop=False)
        return True

    def _bury(self, w: _Worker) -> None:
        """A worker exited: fail its task, replace it, keep the others going."""
        # Read what it sent before dying (a result, its last printed lines).
        while True:
            try:
                if not w.conn.poll(0):
                    break
            except (EOFError, OSError):
                break
            if not self._receive(w):
                break
        w.process.join(timeout=1.0)
        pid, exitcode = w.process.pid, w.process.exitcode
        kill_process_group(pid)  # what its tasks started dies with it
        with self._lock:
            if w in self._workers:
                self._workers.remove(w)
            future, w.task = w.task, None
            if not w.ready and not w.retiring and self._broken is None:
                self._startup_failures += 1
                if self._startup_failures >= MAX_STARTUP_FAILURES:
                    self._broken = WorkerCrashedError(
                        f"{MAX_STARTUP_FAILURES} workers in a row died while starting, the last "
                        f"as {describe_exit(pid, exitcode)}; the pool stopped replacing them. "
                        f"{self.startup_failure_advice}, then create a new pool",
                        exitcode=exitcode,
                    )
            replace = not (self._closing or self._stopped or self._broken is not None)
            if replace and not w.retiring:
                self._workers.append(self._spawn())
            self._dispatch_idle()
        self._close_worker(w)
        if future is not None:
            # WorkerMemoryError when the memory watcher stopped it.
            future.settle(
                exc=self.resources.crash_error(
                    describe_exit(pid, exitcode) + " while running a task",
                    pid=pid,
                    exitcode=exitcode,
                )
            )
        if self._broken is not None:
            self._fail_everything(self._broken, stop=False)

    def _retire(self, w: _Worker) -> None:
        w.retiring = True
        with contextlib.suppress(Exception):
            w.conn.send_bytes(QUIT)

    def _retire_all(self) -> None:
        for w in self._workers:
            self._retire(w)
        for w in list(self._workers):
            w.process.join(timeout=5.0)
            if w.process.exitcode is None:
                w.process.kill()
                w.process.join(timeout=1.0)
            kill_process_group(w.process.pid)
            self._close_worker(w)
        self._workers.clear()
        self._stopped = True
        _live_pools.discard(self)

    @staticmethod
    def _close_worker(w: _Worker) -> None:
        # The Process object itself is left to the garbage collector: another
        # thread may still be joining it, and its finalizer closes its sentinel.
        for conn in (w.conn, w.lifeline):
            with contextlib.suppress(Exception):
                conn.close()

    def _fail_everything(self, error: BaseException, *, stop: bool = True) -> None:
        with self._lock:
            queued = [q.future for q in self._queue]
            self._queue.clear()
            running = [w.task for w in self._workers if w.task is not None]
            if stop:
                self._stopped = True
        for future in [*queued, *running]:
            future.settle(exc=error)

    # -- shutting down --------------------------------------------------------

    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        with self._lock:
            dispatcher = self._dispatcher
            if dispatcher is None or self._stopped:
                self._stopped = True
                return
            self._closing = True
        if kill:
            self._kill_all()
        else:
            self._wake()
            if wait:
                dispatcher.join()
        if not dispatcher.is_alive() or kill:
            self._close_wakeup()

    def kill_now(self) -> None:
        """SIGKILL every worker at once, then shut down (no SIGTERM grace period)."""
        with self._lock:
            workers = list(self._workers)
        for w in workers:
            with contextlib.suppress(Exception):
                w.process.kill()
        self.shutdown(wait=False, kill=True)

    def _kill_all(self) -> None:
        """Stop every worker now, even one stuck in a task; fail unfinished futures."""
        self._fail_everything(
            WorkerCrashedError("the process pool was shut down (kill) before this task finished")
        )
        self._wake()
        with self._lock:
            workers = list(self._workers)
            self._workers.clear()
        for w in workers:
            with contextlib.suppress(Exception):
                w.process.terminate()
        for w in workers:
            w.process.join(timeout=KILL_GRACE_SECONDS)
            if w.process.exitcode is None:
                with contextlib.suppress(Exception):
                    w.process.kill()
                w.process.join(timeout=KILL_GRACE_SECONDS)
        if self._dispatcher is not None and self._dispatcher is not threading.current_thread():
            self._dispatcher.join(timeout=KILL_GRACE_SECONDS)
        for w in workers:
            kill_process_group(w.process.pid)
            self._close_worker(w)
        _live_pools.discard(self)

    def _close_wakeup(self) -> None:
        with self._lock:
            fds = [fd for fd in (self._wake_r, self._wake_w) if fd is not None]
            self._wake_r = self._wake_w = None
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
