"""The user API: :func:`map` and :class:`Executor`.

Both resolve ``backend=`` (a registered name or a Backend instance), choose
the serializer (the caller's, else the backend's default) and hand the work
to the scheduler.  Named backends used by :func:`map` are kept warm between
calls (one pool per name and worker count) and stopped at interpreter exit.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from typing import Any, ParamSpec, TypeVar

from procession import pools
from procession.backends.base import Backend
from procession.backends.registry import create_backend
from procession.options import MapOptions, OnError, check_workers
from procession.scheduler import MapRun, settle_future, submit_call
from procession.serialization.serializers import Serializer, get_serializer
from procession.worker import encode_setup

__all__ = ["Executor", "default_backend_name", "map", "resolve_backend", "shutdown_shared_backends"]

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_BACKEND = "process"
BACKEND_ENV_VAR = "PROCESSION_BACKEND"


def default_backend_name() -> str:
    """``$PROCESSION_BACKEND`` if set, else ``"process"``."""
    return os.environ.get(BACKEND_ENV_VAR) or DEFAULT_BACKEND


def resolve_backend(backend: str | Backend | None, workers: int | None) -> Backend:
    """A shared, warm backend for a name (or the instance given)."""
    workers = check_workers(workers)
    if isinstance(backend, Backend):
        if workers is not None and workers != backend.workers:
            raise ValueError(
                f"workers={workers} conflicts with the backend instance's "
                f"{backend.workers} workers; pass workers= to create_backend() instead"
            )
        return backend
    name = default_backend_name() if backend is None else backend
    if not isinstance(name, str):
        raise TypeError(
            f"backend= must be a backend name or a procession.Backend, got {type(backend).__name__}"
        )
    return pools.shared_backend(name, workers)


def shutdown_shared_backends(*, kill: bool = False) -> None:
    """Stop every warm pool that :func:`map` started (see :mod:`procession.pools`)."""
    pools.shutdown_shared_pools(kill=kill)


def map(
    fn: Callable[..., T],
    iterable: Iterable[Any],
    *,
    backend: str | Backend | None = None,
    workers: int | None = None,
    chunksize: int | str = "auto",
    ordered: bool = True,
    timeout: float | None = None,
    retries: int = 0,
    serializer: str | Serializer | None = None,
    progress: bool = False,
    on_error: OnError = "raise",
) -> Iterator[T]:
    """Apply ``fn`` to every item of ``iterable`` in parallel; a lazy iterator.

    Example::

        >>> list(procession.map(abs, [-1, -2, 3], backend="threads"))
        [1, 2, 3]

    Input is read only as fast as workers free up.  ``ordered=False`` yields in
    completion order.  ``timeout`` is per item (process backends kill and
    replace the worker), ``retries`` re-runs items lost to a crashed worker,
    ``on_error="return"`` yields exceptions in place instead of raising.
    """
    options = MapOptions(
        chunksize=chunksize,
        ordered=ordered,
        timeout=timeout,
        retries=retries,
        on_error=on_error,
        progress=progress,
    )
    chosen = resolve_backend(backend, workers)
    run = MapRun(
        chosen,
        fn,
        iterable,
        serializer=get_serializer(serializer, chosen.default_serializer),
        options=options,
        on_abort=None if isinstance(backend, Backend) else lambda: pools.forget_shared_pool(chosen),
    )
    return run


class Executor(futures.Executor):
    """A ``concurrent.futures.Executor`` on any procession backend.

    Example::

        with procession.Executor(backend="process", workers=4) as ex:
            future = ex.submit(pow, 2, 10)
            assert future.result() == 1024
            squares = list(ex.map(lambda x: x * x, range(10)))

    Accepts ``ProcessPoolExecutor``'s arguments too (``max_workers``,
    ``mp_context``, ``initializer``, ``initargs``, ``max_tasks_per_child``), so
    ``from procession import Executor as ProcessPoolExecutor`` works.  Workers
    are reused across calls.  ``memory_limit=``, ``threads_per_worker=`` and
    ``env=`` control each worker's resources (see docs/resources.md).
    """

    def __init__(
        self,
        backend: str | Backend | int | None = None,
        workers: int | None = None,
        serializer: str | Serializer | None = None,
        *,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_child: int | None = None,
        memory_limit: int | str | None = None,
        threads_per_worker: int | str | None = "auto",
        env: dict[str, str] | None = None,
    ) -> None:
        if isinstance(backend, int) and not isinstance(backend, bool):
            # ProcessPoolExecutor(4): the first positional argument is max_workers.
            backend, max_workers = None, backend
        if workers is not None and max_workers is not None and workers != max_workers:
            raise ValueError(f"workers={workers} and max_workers={max_workers} disagree; pass one")
        count = (
            check_workers(workers)
            if workers is not None
            else check_workers(max_workers, name="max_workers")
        )
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, got {type(initializer).__name__}")
        self._lock = threading.Lock()
        self._shutdown = False
        self._pending: set[futures.Future[Any]] = set()
        if isinstance(backend, Backend):
            if count is not None and count != backend.workers:
                raise ValueError(
                    f"workers={count} conflicts with the backend instance's {backend.workers} "
                    f"workers; pass workers= to create_backend() instead"
                )
            resources = memory_limit is not None or threads_per_worker != "auto" or env
            if (
                initializer is not None
                or mp_context is not None
                or max_tasks_per_child
                or resources
            ):
                raise ValueError(
                    "initializer=, mp_context=, max_tasks_per_child=, memory_limit=, "
                    "threads_per_worker= and env= configure new workers; "
                    "give them to create_backend() instead of passing a backend instance"
                )
            self._backend = backend
            self._owns_backend = False
            self._serializer = get_serializer(serializer, backend.default_serializer)
            return
        name = default_backend_name() if backend is None else backend
        if not isinstance(name, str):
            raise TypeError(
                f"backend= must be a backend name or a procession.Backend, "
                f"got {type(backend).__name__}"
            )
        from procession.backends.registry import get_backend_class

        factory = get_backend_class(name)
        default_serializer = getattr(factory, "default_serializer", "cloudpickle")
        self._serializer = get_serializer(serializer, default_serializer)
        options: dict[str, Any] = {"workers": count}
        if initializer is not None:
            options["worker_setup"] = encode_setup(self._serializer, initializer, tuple(initargs))
        if mp_context is not None:
            options["start_method"] = mp_context.get_start_method()
        if max_tasks_per_child is not None:
            options["max_tasks_per_worker"] = max_tasks_per_child
        # Resource options (docs/resources.md): only the ones set, so that a backend
        # without them still works; create_backend refuses those it cannot honour.
        if memory_limit is not None:
            options["memory_limit"] = memory_limit
        if threads_per_worker != "auto":
            options["threads_per_worker"] = threads_per_worker
        if env is not None:
            options["env"] = env
        try:
            self._backend = create_backend(name, **options)
        except TypeError as exc:
            raise ValueError(
                f"backend {name!r} does not accept these options "
                f"({', '.join(k for k, v in options.items() if v is not None)}): {exc}"
            ) from exc
        self._owns_backend = True

    @property
    def backend(self) -> Backend:
        """The backend this executor runs on."""
        return self._backend

    def _check_open(self) -> None:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> futures.Future[T]:
        """Run ``fn(*args, **kwargs)`` on a worker; returns a concurrent.futures.Future."""
        with self._lock:
            self._check_open()
            future = submit_call(self._backend, self._serializer, fn, args, kwargs)
            self._pending.add(future)
        future.add_done_callback(self._discard)
        return future

    def _discard(self, future: futures.Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | str = "auto",
        ordered: bool = True,
        retries: int = 0,
        on_error: OnError = "raise",
        progress: bool = False,
        serializer: str | Serializer | None = None,
    ) -> Iterator[T]:
        """Like :func:`procession.map` on this executor's workers.

        Several iterables are zipped and their items passed as positional
        arguments, as with the builtin ``map``.  ``timeout`` is per item.
        """
        options = MapOptions(
            chunksize=chunksize,
            ordered=ordered,
            timeout=timeout,
            retries=retries,
            on_error=on_error,
            progress=progress,
        )
        self._check_open()
        if not iterables:
            raise TypeError("Executor.map() needs at least one iterable")
        star = len(iterables) > 1
        source: Iterable[Any] = (
            ((args, {}) for args in zip(*iterables, strict=False)) if star else iterables[0]
        )
        run = MapRun(
            self._backend,
            fn,
            source,
            serializer=self._serializer if serializer is None else get_serializer(serializer),
            star=star,
            options=options,
            on_abort=self.kill_workers,
        )
        return run

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; with ``wait`` block until submitted work is done."""
        with self._lock:
            self._shutdown = True
            pending = list(self._pending)
        if cancel_futures:
            for future in pending:
                future.cancel()
        if wait:
            futures.wait(pending)
        if self._owns_backend:
            self._backend.shutdown(wait=wait)

    def terminate_workers(self) -> None:
        """Stop every worker now (even one running a hung task); pending futures fail."""
        self._stop_now()

    def kill_workers(self) -> None:
        """Like :meth:`terminate_workers`, with no grace period."""
        self._stop_now()

    def _stop_now(self) -> None:
        from procession.errors import WorkerCrashedError

        with self._lock:
            self._shutdown = True
            pending = list(self._pending)
        self._backend.shutdown(wait=False, kill=True)
        for future in pending:
            settle_future(
                future,
                exc=WorkerCrashedError(
                    "the executor's workers were terminated "
                    "(terminate_workers()/kill_workers()) before this task finished"
                ),
            )

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown(wait=True)
