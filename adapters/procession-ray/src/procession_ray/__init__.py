"""A Ray backend for procession: ``backend="ray"``.

Each procession worker is a Ray actor (one process, one task at a time), so a
worker's Recipes are built once and reused, a task over ``timeout=`` is
stopped by killing its actor, and a worker that dies fails its task with
:class:`procession.WorkerCrashedError` (the actor is replaced).

    scheduler ─submit(bytes)─► RayBackend ─► dispatcher thread ──actor.run.remote(bytes)──►
        ▲                       queue of tasks;   idle actor? send the next task
        └── TaskFuture ◄──────── events ◄──────── ObjectRef.future() callbacks, kills

Large arguments (pickle protocol-5 buffers of at least the threshold) go to
Ray's object store once per map (``store_buffer`` is ``ray.put``) and reach
each task as an object reference Ray resolves in the actor.

By default it starts a local Ray instance (``ray.init(num_cpus=workers,
include_dashboard=False)``) shared by every RayBackend in the process and
shut down when the last one is; ``address="ray://host:10001"`` (or
``"auto"``) connects to an existing cluster instead.  If Ray is already
initialised (you called ``ray.init`` yourself), that session is used and left
running.

Example::

    backend = procession.create_backend("ray", workers=8, address="auto")
    with backend:
        results = list(procession.map(score, rows, backend=backend))
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, ClassVar

import procession
from procession import (
    BackendUnavailableError,
    Capabilities,
    StoredBuffer,
    TaskFuture,
    WorkerCrashedError,
)
from procession import worker as procession_worker

__all__ = ["RayBackend"]

INSTALL_HINT = "pip install procession-ray (which installs ray)"


class _Worker:
    """The actor: one procession worker process.  Runs tasks one at a time."""

    def __init__(self, setup: bytes | None, sys_path: list[str] | None) -> None:
        if sys_path:
            import sys

            # As multiprocessing's spawn does: modules the driver imports by path
            # (a script's directory, test modules) import here too.
            missing = [entry for entry in sys_path if entry not in sys.path]
            sys.path[:0] = missing
        self._setup_error: BaseException | None = None
        try:
            procession_worker.initialize_worker(setup)
        except BaseException as exc:
            # Reported with every task instead of killing the actor, which
            # would only be restarted to fail again.
            self._setup_error = exc

    def ping(self) -> int:
        return os.getpid()

    def run(self, task: bytes, keys: tuple[str, ...] = (), *buffers: Any) -> bytes:
        """Run one task; ``buffers``: the large arguments it names, which Ray
        fetched from its object store (object references passed as arguments
        arrive as their values)."""
        if self._setup_error is not None:
            raise self._setup_error
        return procession_worker.run_task(task, dict(zip(keys, buffers, strict=True)) or None)


# -- the Ray session shared by every RayBackend of this process --------------

_session_lock = threading.Lock()
_session_users = 0
_session_owned = False  # True when a RayBackend called ray.init (and so must shut it down)
_session_daemons: set[int] = set()  # local processes that our ray.init started


def _children_of(pids: set[int]) -> dict[int, set[int]]:
    """Linux: parent pid -> child pids, read from /proc (empty elsewhere)."""
    tree: dict[int, set[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return tree
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                data = stat.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after the last ')'.
        fields = data[data.rfind(b")") + 2 :].split()
        if len(fields) > 1 and fields[0] != b"Z":
            tree.setdefault(int(fields[1]), set()).add(int(entry))
    return tree


def _descendants(roots: set[int]) -> set[int]:
    tree = _children_of(roots)
    found: set[int] = set()
    todo = [pid for pid in roots if pid in tree or os.path.exists(f"/proc/{pid}")]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(tree.get(pid, ()))
    return found


def _import_ray(local: bool) -> Any:
    import sys

    if local and "ray" not in sys.modules:
        # Under `uv run`, Ray would start each worker with `uv run` in an uploaded
        # copy of the working directory (building a fresh environment there).
        # Local workers run this very interpreter, so skip that (read at import).
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray

    return ray


def _acquire_session(address: str | None, num_cpus: int, init_options: dict[str, Any]) -> None:
    global _session_users, _session_owned, _session_daemons
    ray = _import_ray(local=address is None)

    with _session_lock:
        if _session_users == 0 and not ray.is_initialized():
            me = os.getpid()
            before = _children_of({me}).get(me, set())
            options: dict[str, Any] = {"include_dashboard": False, **init_options}
            if address is None:
                options.setdefault("num_cpus", num_cpus)
            else:
                options["address"] = address
            ray.init(**options)
            _session_owned = True
            _session_daemons = _children_of({me}).get(me, set()) - before
        _session_users += 1


def _release_session() -> None:
    global _session_users, _session_owned, _session_daemons
    import ray

    with _session_lock:
        _session_users -= 1
        if _session_users > 0 or not _session_owned:
            return
        _session_owned = False
        daemons, _session_daemons = _session_daemons, set()
        ray.shutdown()
    # ray.shutdown() signals its processes; make sure none outlives the backend.
    _reap(daemons)


def _reap(pids: set[int], grace: float = 5.0) -> None:
    import signal
    import time

    deadline = time.monotonic() + grace
    alive = _descendants(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = _descendants(pids)
    for pid in alive:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


# -- the backend --------------------------------------------------------------


@dataclass(eq=False)
class _Slot:
    """One actor and the task it is running."""

    actor: Any
    pid: int | None = None
    ready: bool = False
    future: TaskFuture | None = None
    dead: bool = False


@dataclass
class _State:
    slots: list[_Slot] = field(default_factory=list)
    queued: deque[tuple[TaskFuture, bytes, tuple[StoredBuffer, ...]]] = field(default_factory=deque)


class RayBackend(procession.Backend):
    """Runs tasks on Ray actors, one actor per worker.

    Options: ``address`` (None: start a local Ray; else what ``ray.init``
    accepts, e.g. ``"auto"`` or ``"ray://head:10001"``), ``num_cpus`` (the
    local instance's CPUs; default ``workers``), ``cpus_per_worker`` (the CPU
    resource each actor holds; default None, Ray's default for actors: none
    once placed, so several backends can share a session), ``init_options`` (more
    ``ray.init`` keywords) and ``start_timeout`` (seconds to wait for the
    actors, default 120).
    """

    name: ClassVar[str] = "ray"
    # buffer_store: large arguments go to Ray's object store once per map.
    capabilities = Capabilities(
        isolated=True, kill=True, crash_detection=True, remote=True, buffer_store=True
    )
    default_serializer: ClassVar[str] = "cloudpickle"

    def __init__(
        self,
        *,
        workers: int | None = None,
        worker_setup: bytes | None = None,
        address: str | None = None,
        num_cpus: int | None = None,
        cpus_per_worker: float | None = None,
        init_options: dict[str, Any] | None = None,
        start_timeout: float = 120.0,
    ) -> None:
        super().__init__(workers=workers, worker_setup=worker_setup)
        self.address = address
        self.num_cpus = num_cpus if num_cpus is not None else self.workers
        self.cpus_per_worker = cpus_per_worker
        self.init_options = dict(init_options or {})
        self.start_timeout = start_timeout
        self._lock = threading.Lock()
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._state = _State()
        self._dispatcher: threading.Thread | None = None
        self._actor_class: Any = None
        self._closing = False

    @classmethod
    def check_available(cls) -> None:
        if importlib.util.find_spec("ray") is None:
            raise BackendUnavailableError(f"the 'ray' backend needs Ray: {INSTALL_HINT}")

    # -- lifecycle ----------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._dispatcher is not None

    def start(self) -> None:
        with self._lock:
            if self._dispatcher is not None:
                return
            _acquire_session(self.address, self.num_cpus, self.init_options)
            import ray

            try:
                # procession retries lost tasks itself (retries=): Ray must not.
                options: dict[str, Any] = {
                    "max_restarts": 0,
                    "max_task_retries": 0,
                    "scheduling_strategy": "SPREAD",
                }
                if self.cpus_per_worker is not None:
                    options["num_cpus"] = self.cpus_per_worker
                self._actor_class = ray.remote(**options)(_Worker)
                slots = [_Slot(self._new_actor()) for _ in range(self.workers)]
                # Wait for every actor, so timeouts measure tasks, not process start-up.
                pids = ray.get(
                    [slot.actor.ping.remote() for slot in slots], timeout=self.start_timeout
                )
            except BaseException:
                _release_session()
                raise
            for slot, pid in zip(slots, pids, strict=True):
                slot.pid, slot.ready = pid, True
            self._state = _State(slots=slots)
            self._closing = False
            self._events = queue.SimpleQueue()
            self._dispatcher = threading.Thread(
                target=self._dispatch_loop, name="procession-ray-dispatcher", daemon=True
            )
            self._dispatcher.start()

    def _new_actor(self) -> Any:
        import sys

        # Local workers run this machine's interpreter: give them the driver's
        # import path.  A cluster's nodes have their own (use Ray's runtime_env).
        sys_path = list(sys.path) if self.address is None else None
        return self._actor_class.remote(self.worker_setup, sys_path)

    def submit(self, task: bytes) -> TaskFuture:
        return self.submit_with_buffers(task, [])

    def store_buffer(self, data: bytes) -> StoredBuffer:
        """Put ``data`` in Ray's object store once; every task naming it gets it from there."""
        self.start()
        import ray

        ref = ray.put(data)
        return StoredBuffer(key=ref.hex(), nbytes=len(data), data=data, ref=ref)

    def drop_buffers(self, buffers: list[StoredBuffer]) -> None:
        # Ray frees an object once no reference to it is left (tasks in flight hold theirs).
        for stored in buffers:
            stored.ref = None

    def submit_with_buffers(self, task: bytes, buffers: list[StoredBuffer]) -> TaskFuture:
        self.start()
        future = TaskFuture()
        self._events.put(("submit", future, task, tuple(buffers)))
        return future

    def kill_task(self, future: TaskFuture) -> None:
        self._events.put(("kill", future))

    def worker_pids(self) -> set[int]:
        if self._dispatcher is None:
            return set()
        pids = {slot.pid for slot in self._state.slots if slot.pid is not None and not slot.dead}
        with _session_lock:
            daemons = set(_session_daemons)
        # Locally started Ray: its daemons and the worker processes they spawn
        # are ours too (a leak check must not mistake them for leftovers).
        return pids | _descendants(daemons) if daemons else pids

    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        if not wait and not kill:
            # concurrent.futures semantics: return now, let submitted tasks finish.
            threading.Thread(
                target=self.shutdown, name="procession-ray-shutdown", daemon=True
            ).start()
            return
        with self._lock:
            dispatcher = self._dispatcher
            if dispatcher is None:
                return
            if not kill:
                done = Future[None]()
                self._events.put(("drain", done))
                done.result()
            self._events.put(("stop",))
            dispatcher.join()
            self._dispatcher = None
            _release_session()

    # -- the dispatcher thread: owns self._state -----------------------------

    def _dispatch_loop(self) -> None:
        drains: list[Future[None]] = []
        while True:
            event = self._events.get()
            try:
                if self._handle(event, drains):
                    return
            except Exception as exc:
                # Ray itself failed (e.g. its session was shut down under us): no
                # future may wait forever, so fail the work this backend holds.
                self._fail_all(
                    WorkerCrashedError(f"the ray backend failed: {type(exc).__name__}: {exc}")
                )
                if event[0] == "stop":
                    return
            if (
                drains
                and not self._state.queued
                and all(slot.future is None for slot in self._state.slots)
            ):
                for done in drains:
                    done.set_result(None)
                drains.clear()

    def _handle(self, event: tuple[Any, ...], drains: list[Future[None]]) -> bool:
        """Apply one event; True when the dispatcher must stop."""
        kind = event[0]
        if kind == "submit":
            self._state.queued.append((event[1], event[2], event[3]))
        elif kind == "done":
            self._finish(event[1], event[2], event[3])
        elif kind == "ready":
            slot, outcome = event[1], event[2]
            if not slot.dead:
                try:
                    slot.pid, slot.ready = outcome.result(), True
                except Exception:
                    self._replace(slot)
        elif kind == "kill":
            self._kill(event[1])
        elif kind == "drain":
            drains.append(event[1])
        elif kind == "stop":
            try:
                self._stop_all()
            finally:
                for done in drains:
                    done.set_result(None)
            return True
        self._send_queued()
        return False

    def _fail_all(self, error: BaseException) -> None:
        state = self._state
        while state.queued:
            future, _, _ = state.queued.popleft()
            future.settle(exc=error)
        for slot in state.slots:
            if slot.future is not None:
                slot.future.settle(exc=error)
                slot.future = None

    def _send_queued(self) -> None:
        state = self._state
        for slot in state.slots:
            if not state.queued:
                return
            if slot.dead or not slot.ready or slot.future is not None:
                continue
            while state.queued:
                future, task, buffers = state.queued.popleft()
                if future.set_running_or_notify_cancel():
                    break
            else:
                return
            slot.future = future
            future.mark_started(f"ray actor pid {slot.pid}")
            keys = tuple(stored.key for stored in buffers)
            ref = slot.actor.run.remote(task, keys, *(stored.ref for stored in buffers))
            ref.future().add_done_callback(
                lambda outcome, slot=slot, future=future: self._events.put(
                    ("done", slot, future, outcome)
                )
            )

    def _finish(self, slot: _Slot, future: TaskFuture, outcome: Future[bytes]) -> None:
        if slot.future is not future:
            return  # killed earlier; its slot was replaced
        slot.future = None
        try:
            data = outcome.result()
        except BaseException as exc:
            error = self._translate(exc, slot)
            if isinstance(error, WorkerCrashedError):
                self._replace(slot)
            future.settle(exc=error)
            return
        future.settle(data)

    @staticmethod
    def _translate(exc: BaseException, slot: _Slot) -> BaseException:
        from ray import exceptions as ray_errors

        if isinstance(exc, ray_errors.RayTaskError):
            # An exception the actor raised itself (a failed initializer): unwrap it.
            cause = getattr(exc, "cause", None)
            return cause if isinstance(cause, BaseException) else exc
        if isinstance(exc, ray_errors.RayActorError | ray_errors.WorkerCrashedError):
            crash = WorkerCrashedError(
                f"ray worker (actor process pid {slot.pid}) died while running the task "
                f"({type(exc).__name__}); it was replaced"
            )
            crash.__cause__ = exc
            return crash
        return exc

    def _kill(self, future: TaskFuture) -> None:
        for slot in self._state.slots:
            if slot.future is future:
                slot.future = None
                self._replace(slot)
                future.settle(
                    exc=WorkerCrashedError(
                        f"the task was stopped: its ray worker (pid {slot.pid}) was killed "
                        f"and replaced"
                    ),
                )
                return

    def _replace(self, slot: _Slot) -> None:
        import ray

        slot.dead = True
        with contextlib.suppress(Exception):
            ray.kill(slot.actor, no_restart=True)
        slots = self._state.slots
        if self._closing or slot not in slots:
            return  # shutting down, or replaced already
        fresh = _Slot(self._new_actor())
        slots[slots.index(slot)] = fresh
        fresh.actor.ping.remote().future().add_done_callback(
            lambda outcome, fresh=fresh: self._events.put(("ready", fresh, outcome))
        )

    def _stop_all(self) -> None:
        import ray

        self._closing = True
        state = self._state
        while state.queued:
            future, _, _ = state.queued.popleft()
            if future.set_running_or_notify_cancel():
                future.settle(exc=WorkerCrashedError("the ray backend was shut down first"))
        for slot in state.slots:
            if slot.future is not None:
                slot.future.settle(
                    exc=WorkerCrashedError("the ray backend was shut down while this task ran")
                )
                slot.future = None
            slot.dead = True
            with contextlib.suppress(Exception):
                ray.kill(slot.actor, no_restart=True)
