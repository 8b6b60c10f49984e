"""The contract between the scheduler and a backend.

A backend is deliberately small: it starts workers, moves opaque task bytes
to them, calls :func:`procession.worker.run_task` there, and hands the result
bytes back through a :class:`TaskFuture`.  It knows nothing of chunking,
ordering, retries, serializers or timeouts; the scheduler does all of that,
once, for every backend.

    scheduler ──submit(task bytes)──► Backend ──► worker: run_task(bytes) -> bytes
        ▲                               │
        └──── TaskFuture[bytes] ◄───────┘   (or WorkerCrashedError when a worker died)
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "Backend",
    "Capabilities",
    "StoredBuffer",
    "TaskFuture",
    "default_worker_count",
    "settle_future",
]


@dataclass(frozen=True)
class Capabilities:
    """What a backend can promise; the scheduler rejects options it cannot honour.

    - ``isolated``: tasks run in other processes (a crash cannot take the caller down).
    - ``kill``: :meth:`Backend.kill_task` can stop a running task, so ``timeout=`` works.
    - ``crash_detection``: a dead worker fails its task with ``WorkerCrashedError``
      (rather than hanging), so ``retries=`` can re-run it.
    - ``remote``: workers may run on other machines.
    - ``buffer_store``: the backend keeps large argument buffers on its side
      (:meth:`Backend.store_buffer`) and delivers them with the tasks that
      name them (:meth:`Backend.submit_with_buffers`), so a map sends each
      once rather than with every task (Dask's scatter, Ray's object store).
    - ``memory_limit``, ``threads_per_worker``, ``env``: the backend accepts the
      resource option of that name (see ``procession.backends._resources``);
      :func:`procession.create_backend` refuses a set option a backend lacks.
    """

    isolated: bool
    kill: bool
    crash_detection: bool
    remote: bool = False
    buffer_store: bool = False
    memory_limit: bool = False
    threads_per_worker: bool = False
    env: bool = False

    def names(self) -> list[str]:
        return [name for name, value in vars(self).items() if value]


@dataclass(eq=False)
class StoredBuffer:
    """A large buffer a backend keeps where its workers can read it.

    ``key`` names it in task payloads (unique while it lives); ``nbytes`` is
    its size; ``data`` is the parent's copy (a backend may store it again from
    there if the workers holding it were lost); ``ref`` is the backend's own
    handle (a Dask future, a Ray object reference), which it may replace.
    """

    key: str
    nbytes: int
    data: bytes
    ref: Any = None


class TaskFuture(Future[bytes]):
    """A future for one task's result bytes.

    A backend calls :meth:`mark_started` when a worker actually begins the
    task (the scheduler measures ``timeout=`` from there) and may record the
    worker's identity in ``worker``.

    Example (what a backend's ``submit`` returns; the scheduler reads it)::

        future = procession.TaskFuture()
        if future.set_running_or_notify_cancel():   # False: cancelled while queued
            future.mark_started("worker-1")         # timeout= is measured from here
            future.set_result(worker.run_task(task))
    """

    def __init__(self) -> None:
        super().__init__()
        self.started_at: float | None = None
        self.worker: Any = None
        self._start_callbacks: list[Callable[[TaskFuture], object]] = []

    def mark_started(self, worker: Any = None) -> None:
        """Record that a worker (``worker``: any identity) has begun this task, now."""
        with self._condition:
            self.started_at = time.monotonic()
            self.worker = worker
            callbacks, self._start_callbacks = self._start_callbacks, []
        for callback in callbacks:
            callback(self)

    def settle(self, result: bytes | None = None, *, exc: BaseException | None = None) -> bool:
        """Finish the task with ``result`` bytes or ``exc``: the first answer wins.

        Safe to call from any thread, any number of times: a future already
        done or cancelled is left as it is.  Returns whether this call settled it.

        Example::

            future.settle(exc=WorkerCrashedError("worker pid 12 was killed by SIGKILL"))
        """
        return settle_future(self, value=result, exc=exc)

    def requeue(self) -> None:
        """The task goes back to the queue (its worker died before it could answer,
        through no fault of its own): forget its start, so ``timeout=`` counts
        from its next start and :meth:`add_start_callback` callbacks fire again."""
        with self._condition:
            self.started_at = None
            self.worker = None

    def add_start_callback(self, callback: Callable[[TaskFuture], object]) -> None:
        """Call ``callback(self)`` once a worker starts the task (at once if it has)."""
        with self._condition:
            if self.started_at is None:
                self._start_callbacks.append(callback)
                return
        callback(self)


def settle_future(
    future: Future[Any], *, value: Any = None, exc: BaseException | None = None
) -> bool:
    """Finish ``future`` unless it is done or cancelled already (first answer wins).

    The one place where procession settles a future, a backend's
    :class:`TaskFuture` or a user's ``concurrent.futures.Future``.
    """
    if future.done():
        return False
    try:
        if not future.running() and not future.set_running_or_notify_cancel():
            return False  # cancelled by the caller
    except RuntimeError:
        pass  # marked running concurrently by the task's start
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)
    except Exception:  # settled concurrently (cancelled or killed): keep the first answer
        return False
    return True


def default_worker_count() -> int:
    """CPUs this process may use (``os.process_cpu_count()`` on 3.13+)."""
    counter = getattr(os, "process_cpu_count", None)
    if counter is not None:
        count = counter()
    elif hasattr(os, "sched_getaffinity"):
        count = len(os.sched_getaffinity(0))
    else:
        count = os.cpu_count()
    return max(1, count or 1)


class Backend(ABC):
    """The abstract base a backend implements.  Subclass it, then register it:

    Example::

        class InlineBackend(procession.Backend):
            name = "inline"
            capabilities = procession.Capabilities(
                isolated=False, kill=False, crash_detection=False)

            def start(self): pass
            def submit(self, task):
                future = procession.TaskFuture()
                future.mark_started()
                future.set_result(procession.worker.run_task(task))
                return future
            def shutdown(self, *, wait=True, kill=False): pass

        procession.register_backend("inline", InlineBackend)

    Constructor keywords: ``workers`` (None means a sensible default) and
    ``worker_setup`` (opaque bytes to pass to
    :func:`procession.worker.initialize_worker` in every new worker before its
    first task).  Backend-specific options are further keywords.
    """

    #: Registered name; set by subclasses (used in messages).
    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities(
        isolated=False, kill=False, crash_detection=False
    )
    #: Serializer used when the caller does not choose one.
    default_serializer: ClassVar[str] = "cloudpickle"
    #: The most workers the backend can run (None: no limit); more is refused.
    max_workers: ClassVar[int | None] = None

    def __init__(self, *, workers: int | None = None, worker_setup: bytes | None = None) -> None:
        if workers is not None:
            if isinstance(workers, bool) or not isinstance(workers, int):
                raise TypeError(f"workers must be a positive int or None, got {workers!r}")
            if workers <= 0:
                raise ValueError(f"workers must be a positive int or None, got {workers}")
        self.workers: int = workers if workers is not None else default_worker_count()
        self.worker_setup = worker_setup

    @classmethod  # noqa: B027 (an optional hook, empty by default)
    def check_available(cls) -> None:
        """Raise BackendUnavailableError (naming the ``pip install``) if a dependency
        is missing.  Must be cheap and must not start anything."""

    @abstractmethod
    def start(self) -> None:
        """Start the workers (idempotent; the scheduler calls it before submitting)."""

    @abstractmethod
    def submit(self, task: bytes) -> TaskFuture:
        """Queue ``task`` for a worker; the future resolves to ``run_task(task)``'s bytes.

        If the worker dies while running it, fail the future with
        ``WorkerCrashedError`` (if the backend has ``crash_detection``).
        """

    def store_buffer(self, data: bytes) -> StoredBuffer:
        """Keep ``data`` where the workers can read it; a map stores each large
        argument buffer once.  Only backends with ``capabilities.buffer_store``
        implement this (with :meth:`drop_buffers` and :meth:`submit_with_buffers`).

        Example (what the scheduler does for a buffer of at least the threshold)::

            stored = backend.store_buffer(bytes(array.data))
            future = backend.submit_with_buffers(task, [stored])
            ...
            backend.drop_buffers([stored])   # when the map ends
        """
        raise NotImplementedError(f"backend {self.name!r} cannot store buffers")

    def drop_buffers(self, buffers: list[StoredBuffer]) -> None:  # noqa: B027 (optional hook)
        """Forget buffers no task will need any more (tasks already sent keep theirs)."""

    def submit_with_buffers(self, task: bytes, buffers: list[StoredBuffer]) -> TaskFuture:
        """Like :meth:`submit`, and deliver ``buffers`` with the task: the worker calls
        ``procession.worker.run_task(task, {b.key: <b's bytes> for b in buffers})``."""
        raise NotImplementedError(f"backend {self.name!r} cannot store buffers")

    def kill_task(self, future: TaskFuture) -> None:
        """Stop the running task behind ``future``: kill its worker, replace it, and
        fail the future.  Only backends with ``capabilities.kill`` implement this."""
        raise NotImplementedError(f"backend {self.name!r} cannot kill a running task")

    @abstractmethod
    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        """Stop the workers.  ``wait``: let queued and running tasks finish first.
        ``kill``: terminate the workers now, failing unfinished futures; must
        return within a few seconds even while a task hangs."""

    def kill_now(self) -> None:
        """Stop the workers at once, with no grace period (``Executor.kill_workers()``).

        The default is :meth:`shutdown` with ``kill=True``; process pools
        override it to send SIGKILL straight away.
        """
        self.shutdown(wait=False, kill=True)

    def worker_pids(self) -> set[int]:
        """Process ids of the live workers (empty for in-process backends)."""
        return set()

    @property
    def started(self) -> bool:
        return True

    def __enter__(self) -> Backend:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown(wait=True)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} workers={self.workers}>"
