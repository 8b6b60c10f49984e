"""A joblib parallel backend: scikit-learn and every joblib user on procession.

Example::

    import joblib, procession.joblib
    procession.joblib.register()                      # name "procession"
    with joblib.parallel_config(backend="procession", n_jobs=4, use="process"):
        scores = cross_val_score(model, X, y, cv=5)   # runs on procession's workers

``use=`` names the procession backend (default: procession's default,
``$PROCESSION_BACKEND`` else ``"process"``) or is a ``procession.Backend``
instance; any other keyword (``address=`` for Dask, ``start_method=``...)
goes to :func:`procession.create_backend`.  ``serializer=`` picks how batches
travel (default ``"cloudpickle"``, as loky sends them).

    joblib.Parallel ──batch (BatchedCalls)──► ProcessionBackend.submit
        ▲  auto-batching, ordering,            │ Executor.submit(_RunBatch(batch))
        │  return_as=generator                 ▼
        └── retrieve_result_callback ◄── Future ◄── warm procession pool (reused
                                                    across Parallel calls, like loky)

In each worker a batch first registers this backend with joblib (so a nested
``Parallel(backend="procession")`` resolves there) and caps the BLAS/OpenMP
thread pools as joblib's loky backend does for ``inner_max_num_threads``
(default ``cpu_count() // n_jobs``), then runs the batch.  Inside a worker
``effective_n_jobs`` is 1: a nested call runs in the worker itself instead of
starting a pool of its own; joblib's default nested backend (threads at the
first nesting level, as with loky) is kept.

Not goals: joblib's memmapping of large arrays (``max_nbytes``,
``mmap_mode``, ``temp_folder``) is not used; procession sends large buffers
through shared memory itself.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from joblib import cpu_count
from joblib.parallel import (
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
    register_parallel_backend,
)

from procession import pools
from procession.api import Executor, default_backend_name
from procession.backends._resources import THREAD_ENV_VARS
from procession.backends.base import Backend
from procession.worker import in_worker

__all__ = ["ProcessionBackend", "register"]

#: The environment variables joblib's loky backend sets to cap native thread pools.
THREAD_LIMIT_VARS = THREAD_ENV_VARS

_registered: set[str] = set()
_register_lock = threading.Lock()


def register(name: str = "procession", *, make_default: bool = False) -> None:
    """Register procession as the joblib backend ``name`` (harmless to repeat).

    Example::

        procession.joblib.register()
        with joblib.parallel_config(backend="procession", n_jobs=2):
            joblib.Parallel()(joblib.delayed(abs)(-i) for i in range(4))

    ``make_default=True`` makes it joblib's default backend (as
    ``joblib.register_parallel_backend`` does).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    with _register_lock:
        if name in _registered and not make_default:
            return
        register_parallel_backend(name, _factory(name), make_default=make_default)
        _registered.add(name)


def _factory(name: str) -> type[ProcessionBackend]:
    # joblib compares type(backend) with the registered factory, so register a class.
    if name == ProcessionBackend.registered_as:
        return ProcessionBackend
    return type("ProcessionBackend", (ProcessionBackend,), {"registered_as": name})


# -- what runs in the worker ------------------------------------------------------

# Per worker process: the thread limit applied last and how many modules were
# loaded then (a newly imported BLAS must be capped too).
_applied_limit: tuple[tuple[tuple[str, str], ...], int] | None = None
_limit_lock = threading.Lock()


def _limit_threads(env: dict[str, str]) -> None:
    """Cap native thread pools in this worker, as loky's worker environment does."""
    global _applied_limit
    wanted = tuple(sorted(env.items()))
    with _limit_lock:
        if _applied_limit == (wanted, len(sys.modules)):
            return
        # Read when a library loads (OpenBLAS, MKL, OpenMP): set before any does.
        os.environ.update(env)
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # only the environment then; libraries already loaded keep theirs
            pass
        else:
            # Libraries loaded already: the same caps, per kind of thread pool.
            blas = env.get("OPENBLAS_NUM_THREADS") or env.get("MKL_NUM_THREADS") or "1"
            threadpool_limits(limits={"blas": int(blas), "openmp": int(env["OMP_NUM_THREADS"])})
        _applied_limit = (wanted, len(sys.modules))


class _RunBatch:
    """What a worker runs: registration, thread limits, then joblib's batch."""

    __slots__ = ("batch", "env", "name")

    def __init__(self, batch: Callable[[], Any], env: dict[str, str] | None, name: str) -> None:
        self.batch = batch
        self.env = env
        self.name = name

    def __call__(self) -> Any:
        register(self.name)
        if self.env is not None:
            _limit_threads(self.env)
        return self.batch()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_RunBatch, (self.batch, self.env, self.name))


class _AsyncJob:
    """joblib 1.4's ``apply_async`` handle: ``get(timeout)`` over a future."""

    def __init__(self, future: Future[Any]) -> None:
        self.future = future

    def get(self, timeout: float | None = None) -> Any:
        return self.future.result(timeout=timeout)


# -- warm pools for backends with options -------------------------------------------

_option_pools: dict[tuple[Any, ...], Backend] = {}
_option_lock = threading.Lock()


def _key_part(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return value


def _pool_with_options(name: str, workers: int, options: dict[str, Any]) -> Backend:
    """A warm pool for (name, workers, options), kept like procession.pools' own."""
    key = (name, workers, tuple(sorted((k, _key_part(v)) for k, v in options.items())))
    with _option_lock:
        found = _option_pools.get(key)
        if found is None:
            from procession.backends.registry import create_backend

            found = create_backend(name, workers=workers, **options)
            _option_pools[key] = found
        return found


def _forget_option_pool(backend: Backend) -> None:
    with _option_lock:
        for key, value in list(_option_pools.items()):
            if value is backend:
                del _option_pools[key]


def _shutdown_option_pools() -> None:
    with _option_lock:
        backends = list(_option_pools.values())
        _option_pools.clear()
    for backend in backends:
        backend.shutdown(wait=False, kill=True)


def _reset_after_fork() -> None:
    # The parent's pools (threads, pipes) are not the child's to use or stop.
    global _option_lock, _limit_lock
    _option_lock = threading.Lock()
    _limit_lock = threading.Lock()
    _option_pools.clear()


os.register_at_fork(after_in_child=_reset_after_fork)
atexit.register(_shutdown_option_pools)


# -- the backend -------------------------------------------------------------------


class ProcessionBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
    """joblib's ``ParallelBackendBase`` on a procession backend (joblib 1.4 to 1.6).

    Made by joblib from ``parallel_config(backend="procession", use=..., **options)``
    once :func:`register` ran; see the module docstring.
    """

    supports_retrieve_callback = True
    supports_inner_max_num_threads = True
    #: The name joblib knows this backend by (re-registered under it in workers).
    registered_as = "procession"

    def __init__(
        self,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
        *,
        use: str | Backend | None = None,
        serializer: str | None = None,
        registered_as: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        if isinstance(use, Backend):
            if options:
                raise ValueError(
                    f"backend options {sorted(options)} configure a new backend; "
                    f"give them to procession.create_backend() instead of passing use={use!r}"
                )
            isolated = use.capabilities.isolated
        else:
            name = default_backend_name() if use is None else use
            if not isinstance(name, str):
                raise TypeError(
                    f"use= must be a procession backend name or a procession.Backend, "
                    f"got {type(use).__name__}"
                )
            from procession.backends.registry import available_backends

            infos = available_backends()
            if name not in infos:
                raise ValueError(
                    f"use={name!r} is not a procession backend; choose one of "
                    f"{', '.join(sorted(infos))}"
                )
            caps = infos[name].capabilities
            isolated = caps is not None and caps.isolated
            use = name
        self.use: str | Backend = use
        self.serializer = serializer or "cloudpickle"
        self.options = options
        if registered_as is not None:
            self.registered_as = registered_as
        # An in-process backend (threads) shares memory with the caller.
        self.uses_threads = not isolated
        self.supports_sharedmem = not isolated
        self._isolated = isolated
        self._backend: Backend | None = None
        self._executor: Executor | None = None
        self._env: dict[str, str] | None = None
        self._futures: set[Future[Any]] = set()
        self._futures_lock = threading.Lock()
        self.parallel: Any = None

    def __reduce__(self) -> tuple[Any, ...]:
        # joblib may ship a backend to workers (nested configs); pools stay behind.
        return (
            _rebuild_backend,
            (
                self.nesting_level,
                self.inner_max_num_threads,
                self.use if isinstance(self.use, str) else None,
                self.serializer,
                self.registered_as,
                self.options,
            ),
        )

    # -- sizing ----------------------------------------------------------------

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """Workers a Parallel call gets: 1 inside a worker, where no pool may start."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1
        if in_worker() or multiprocessing.current_process().daemon:
            # A task of a procession pool, or a daemonic process (which cannot have
            # children): run nested calls right here.
            return 1
        if self.use == "serial":
            return 1
        if n_jobs < 0:
            if isinstance(self.use, Backend):
                n_jobs = max(self.use.workers + 1 + n_jobs, 1)
            else:
                n_jobs = max(cpu_count() + 1 + n_jobs, 1)
        return int(n_jobs)

    def configure(
        self,
        n_jobs: int = 1,
        parallel: Any = None,
        prefer: str | None = None,
        require: str | None = None,
        **joblib_options: Any,
    ) -> int:
        """Attach to the warm pool for ``n_jobs`` workers (joblib's memmapping
        options ``max_nbytes``/``mmap_mode``/``temp_folder`` are not used)."""
        n_jobs = self.effective_n_jobs(n_jobs)
        if n_jobs == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self.parallel = parallel
        self._attach(n_jobs)
        return n_jobs

    def _attach(self, n_jobs: int) -> None:
        if isinstance(self.use, Backend):
            backend = self.use
        elif self.options:
            backend = _pool_with_options(self.use, n_jobs, self.options)
        else:
            backend = pools.shared_backend(self.use, n_jobs)
        self._backend = backend
        self._executor = Executor(backend, serializer=self.serializer)
        self._env = self._worker_env(n_jobs) if self._isolated else None

    def _worker_env(self, n_jobs: int) -> dict[str, str]:
        # The rule of joblib's ParallelBackendBase._prepare_worker_env (loky's workers).
        explicit = self.inner_max_num_threads
        default = max(cpu_count() // n_jobs, 1)
        return {
            var: str(explicit if explicit is not None else os.environ.get(var, default))
            for var in THREAD_LIMIT_VARS
        }

    # -- running ---------------------------------------------------------------

    def submit(self, func: Callable[[], Any], callback: Callable[..., Any] | None = None) -> Any:
        """Run one joblib batch on a worker; ``callback(future)`` when it is done."""
        executor = self._executor
        if executor is None:
            raise RuntimeError(
                "the procession joblib backend is not configured: joblib calls "
                "configure() before submit(); use it through joblib.Parallel"
            )
        future = executor.submit(_RunBatch(func, self._env, self.registered_as))
        with self._futures_lock:
            self._futures.add(future)
        future.add_done_callback(self._discard)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def _discard(self, future: Future[Any]) -> None:
        with self._futures_lock:
            self._futures.discard(future)

    def apply_async(
        self, func: Callable[[], Any], callback: Callable[..., Any] | None = None
    ) -> Any:
        """joblib 1.4's name for :meth:`submit`; the handle also has ``get(timeout)``."""
        future = self.submit(func, callback)
        return _AsyncJob(future)

    def retrieve_result_callback(self, out: Any) -> Any:
        """The batch's results, or its exception (the worker's traceback as ``__cause__``)."""
        future = out.future if isinstance(out, _AsyncJob) else out
        return future.result()

    def retrieve_result(self, out: Any, timeout: float | None = None) -> Any:
        future = out.future if isinstance(out, _AsyncJob) else out
        return future.result(timeout=timeout)

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Cancel queued batches; stop running ones by replacing the pool's workers."""
        with self._futures_lock:
            futures = list(self._futures)
        running = [f for f in futures if not f.cancel() and not f.done()]
        backend = self._backend
        if running and backend is not None and backend.capabilities.kill:
            if isinstance(self.use, Backend):
                # Not ours to stop: the caller's instance keeps its workers; the
                # running batches finish and their results are dropped.
                pass
            else:
                # As loky does: kill the workers (a fresh warm pool starts on next use).
                pools.forget_shared_pool(backend, kill=True)
                _forget_option_pool(backend)
                backend.shutdown(wait=False, kill=True)
                self._backend = self._executor = None
                if ensure_ready and self.parallel is not None:
                    self._attach(self.effective_n_jobs(self.parallel.n_jobs))
        self.reset_batch_stats()

    def terminate(self) -> None:
        """End of a Parallel call: the warm pool stays up for the next one."""
        self._executor = None
        self._backend = None
        self.reset_batch_stats()


def _rebuild_backend(
    nesting_level: int | None,
    inner_max_num_threads: int | None,
    use: str | None,
    serializer: str,
    registered_as: str,
    options: dict[str, Any],
) -> ProcessionBackend:
    register(registered_as)
    return ProcessionBackend(
        nesting_level,
        inner_max_num_threads,
        use=use,
        serializer=serializer,
        registered_as=registered_as,
        **options,
    )
