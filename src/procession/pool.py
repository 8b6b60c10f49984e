"""``procession.Pool``: ``multiprocessing.Pool``'s API and semantics on any backend.

Change one import and existing ``Pool`` code runs on procession::

    from procession import Pool          # was: from multiprocessing import Pool

What it adds over the standard library's pool: a worker that dies (signal,
segfault, ``os._exit``) fails its tasks with ``WorkerCrashedError`` instead of
hanging ``map`` forever; lambdas and closures work on the default backend
(functions travel with cloudpickle); no ``if __name__ == "__main__"`` guard is
needed on the ``process`` backend; ``backend=`` runs the same code on threads,
loky or a Dask cluster.

How the calls map onto procession::

    apply_async / map_async / starmap_async ──► Executor.submit, one task per chunk
        (chunks as the stdlib cuts them)         │ futures settle in backend threads
                                                 ▼
                           result-handler thread: callback / error_callback, then ready
    imap / imap_unordered ──► Executor.map(chunksize=..., ordered=...) drained by a
                              pump thread into the IMapIterator (lazy, bounded input)

Callbacks run in one result-handler thread per pool, as in the standard
library, so a callback never blocks the threads that receive results.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from procession.api import Executor
from procession.backends.base import Backend
from procession.errors import WorkerCrashedError
from procession.serialization.serializers import Serializer

__all__ = ["ApplyResult", "AsyncResult", "IMapIterator", "MapResult", "Pool"]

T = TypeVar("T")

_log = logging.getLogger("procession.pool")

_RUN, _CLOSE, _TERMINATE = "RUN", "CLOSE", "TERMINATE"


# -- functions that run in the workers (module level: picklable by reference) --


def _run_chunk(func: Callable[..., Any], chunk: list[Any], star: bool) -> list[Any]:
    """One task of map/starmap: apply ``func`` to every item of the chunk."""
    if star:
        return [func(*args) for args in chunk]
    return [func(item) for item in chunk]


class _Tagged:
    """Wraps a function so a returned exception object is not taken for a failure."""

    __slots__ = ("func",)

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func

    def __call__(self, item: Any) -> tuple[Any]:
        return (self.func(item),)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Tagged, (self.func,))


class _StarTagged(_Tagged):
    __slots__ = ()

    def __call__(self, item: Any) -> tuple[Any]:
        return (self.func(*item),)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_StarTagged, (self.func,))


class _Stoppable(Iterator[Any]):
    """The input of an imap, cut short when the pool is terminated.

    (Killing the workers fails the chunks in flight; this stops the reading of
    more input, so the map ends instead of sending work to a stopped pool.)
    """

    def __init__(self, iterable: Iterable[Any]) -> None:
        self._iterator = iter(iterable)
        self._stopped = False

    def stop(self) -> None:
        self._stopped = True

    def __next__(self) -> Any:
        if self._stopped:
            raise StopIteration
        return next(self._iterator)


# -- results --------------------------------------------------------------------


class ApplyResult(Generic[T]):
    """The result of :meth:`Pool.apply_async` (``multiprocessing.pool.AsyncResult``).

    Example::

        with procession.Pool(2) as pool:
            result = pool.apply_async(pow, (2, 10))
            assert result.get(timeout=30) == 1024
    """

    def __init__(
        self,
        pool: Pool,
        callback: Callable[[Any], object] | None,
        error_callback: Callable[[BaseException], object] | None,
    ) -> None:
        self._pool = pool
        self._event = threading.Event()
        self._callback = callback
        self._error_callback = error_callback
        self._value: Any = None
        self._error: BaseException | None = None
        pool._track(self)

    def ready(self) -> bool:
        """Whether the call has completed (successfully or not)."""
        return self._event.is_set()

    def successful(self) -> bool:
        """Whether the call completed without raising; ``ValueError`` if not ready yet."""
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._error is None

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the result is available or ``timeout`` seconds pass."""
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> T:
        """The result; re-raises the worker's exception (its traceback as ``__cause__``).

        Raises ``multiprocessing.TimeoutError`` if it is not ready within ``timeout``.
        """
        self.wait(timeout)
        if not self.ready():
            raise multiprocessing.TimeoutError(
                f"result not ready after {timeout} s (the task is still queued or running)"
            )
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[no-any-return]

    # Called in the pool's result-handler thread, so callbacks run there.
    def _finish(self, value: Any, error: BaseException | None) -> None:
        self._value, self._error = value, error
        try:
            if error is None:
                if self._callback is not None:
                    self._callback(value)
            elif self._error_callback is not None:
                self._error_callback(error)
        except Exception:
            # The stdlib's result handler would die here and hang the pool; log instead.
            _log.exception("a procession.Pool callback raised; the result is still delivered")
        finally:
            self._event.set()
            self._pool._untrack(self)
            self._callback = self._error_callback = None


#: ``multiprocessing.pool.AsyncResult`` is the name users know.
AsyncResult = ApplyResult


class MapResult(ApplyResult[list[T]]):
    """The result of :meth:`Pool.map_async` / :meth:`Pool.starmap_async`.

    Ready once every chunk is done; on failure it holds the first exception
    that came back, as the standard library's does.
    """

    def __init__(
        self,
        pool: Pool,
        length: int,
        chunks: int,
        callback: Callable[[Any], object] | None,
        error_callback: Callable[[BaseException], object] | None,
    ) -> None:
        super().__init__(pool, callback, error_callback)
        self._parts: list[list[Any] | None] = [None] * chunks
        self._left = chunks
        self._first_error: BaseException | None = None
        self._lock = threading.Lock()
        if chunks == 0:
            pool._notify(self._finish, [], None)

    def _chunk_done(self, index: int, future: Future[list[Any]]) -> None:
        part: list[Any] | None = None
        error: BaseException | None = None
        try:
            part = future.result()
        except BaseException as exc:
            error = exc
        with self._lock:
            self._parts[index] = part
            if error is not None and self._first_error is None:
                self._first_error = error
            self._left -= 1
            last = self._left == 0
        if last:
            if self._first_error is not None:
                self._pool._notify(self._finish, None, self._first_error)
            else:
                values = [v for chunk in self._parts for v in chunk or ()]
                self._parts = []
                self._pool._notify(self._finish, values, None)


class IMapIterator(Iterator[T]):
    """The iterator :meth:`Pool.imap` / :meth:`Pool.imap_unordered` return.

    ``next(timeout)`` raises ``multiprocessing.TimeoutError`` when no result
    arrives in time.  A failed item raises its exception at its place and the
    iteration may continue past it, as with the standard library.
    """

    def __init__(self, pool: Pool, run: Iterator[Any], source: _Stoppable) -> None:
        self._pool = pool
        self._run = run
        self._source = source
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._finished = False
        self._done = threading.Event()
        pool._track(self)
        self._thread = threading.Thread(target=self._pump, name="procession-pool-imap", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            for item in self._run:
                if isinstance(item, tuple):
                    self._queue.put(("value", item[0]))
                else:
                    self._queue.put(("error", item))
        except BaseException as exc:
            self._queue.put(("error", exc))
        finally:
            self._queue.put(("end", None))
            self._done.set()
            self._pool._untrack(self)

    def abort(self) -> None:
        """Read no more input (the pool's terminate() then fails what is in flight)."""
        self._source.stop()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def __iter__(self) -> IMapIterator[T]:
        return self

    def next(self, timeout: float | None = None) -> T:
        """The next result, waiting at most ``timeout`` seconds."""
        if self._finished:
            raise StopIteration
        try:
            kind, payload = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise multiprocessing.TimeoutError(
                f"no result within {timeout} s (the next item is still queued or running)"
            ) from None
        if kind == "value":
            return payload  # type: ignore[no-any-return]
        if kind == "error":
            raise payload
        self._finished = True
        if self._pool._state == _TERMINATE and not self._pool._clean_end(self):
            raise WorkerCrashedError(
                "the pool was terminated (Pool.terminate() or leaving its with block) "
                "before this imap finished; results after this point are lost"
            )
        raise StopIteration

    __next__ = next


# -- the pool -------------------------------------------------------------------


class Pool:
    """``multiprocessing.Pool`` on any procession backend.

    Example::

        with procession.Pool(4) as pool:
            assert pool.map(lambda x: x * x, range(5)) == [0, 1, 4, 9, 16]
            result = pool.apply_async(pow, (2, 10), callback=print)
            assert result.get(timeout=30) == 1024

    ``processes`` is the worker count (default: the CPUs this process may
    use); ``initializer(*initargs)`` runs once in every new worker;
    ``maxtasksperchild`` replaces a worker after that many tasks (on backends
    that can); ``context`` picks the start method (a ``multiprocessing``
    context).  ``backend=`` is a procession backend name or instance,
    ``serializer=`` how functions and data travel (the backend's default if None).
    """

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        context: Any = None,
        *,
        backend: str | Backend | None = None,
        serializer: str | Serializer | None = None,
    ) -> None:
        self._state = _RUN  # set first: __del__/finalizers may look at it
        if processes is not None:
            if isinstance(processes, bool) or not isinstance(processes, int):
                raise TypeError(f"processes must be a positive int or None, got {processes!r}")
            if processes < 1:
                raise ValueError(f"Number of processes must be at least 1, got {processes}")
        if maxtasksperchild is not None and (
            isinstance(maxtasksperchild, bool)
            or not isinstance(maxtasksperchild, int)
            or maxtasksperchild <= 0
        ):
            raise ValueError(
                f"maxtasksperchild must be a positive int or None, got {maxtasksperchild!r}"
            )
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be a callable, got {type(initializer).__name__}")
        self._executor = Executor(
            backend,
            workers=processes,
            serializer=serializer,
            initializer=initializer,
            initargs=tuple(initargs),
            mp_context=context,
            max_tasks_per_child=maxtasksperchild,
        )
        self._processes = self._executor.backend.workers
        self._lock = threading.RLock()
        self._outstanding: set[Any] = set()
        self._idle = threading.Condition(self._lock)
        self._unclean: set[IMapIterator[Any]] = set()
        self._callbacks: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._handler: threading.Thread | None = None
        self._handler_stopped = False
        # A pool dropped without close()/terminate() must not leave workers behind.
        self._finalizer = weakref.finalize(self, _kill_executor, self._executor)

    # -- bookkeeping --------------------------------------------------------

    def _track(self, result: Any) -> None:
        with self._lock:
            self._outstanding.add(result)

    def _untrack(self, result: Any) -> None:
        with self._lock:
            self._outstanding.discard(result)
            if not self._outstanding:
                self._idle.notify_all()

    def _clean_end(self, iterator: IMapIterator[Any]) -> bool:
        with self._lock:
            return iterator not in self._unclean

    def _notify(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` in the result-handler thread (started on first use)."""
        with self._lock:
            stopped = self._handler_stopped
            if self._handler is None and not stopped:
                self._handler = threading.Thread(
                    target=_handle_results,
                    args=(self._callbacks,),
                    name="procession-pool-results",
                    daemon=True,
                )
                self._handler.start()
        if stopped:
            # Late results of a stopped pool: no thread to start, settle them here.
            fn(*args)
        else:
            self._callbacks.put((fn, args))

    def _check_running(self) -> None:
        if self._state != _RUN:
            raise ValueError("Pool not running")

    @property
    def backend(self) -> Backend:
        """The procession backend this pool runs on."""
        return self._executor.backend

    # -- apply ----------------------------------------------------------------

    def apply(
        self, func: Callable[..., T], args: Iterable[Any] = (), kwds: dict[str, Any] | None = None
    ) -> T:
        """Call ``func(*args, **kwds)`` in a worker and wait for the result."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(
        self,
        func: Callable[..., T],
        args: Iterable[Any] = (),
        kwds: dict[str, Any] | None = None,
        callback: Callable[[T], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> ApplyResult[T]:
        """Start ``func(*args, **kwds)`` in a worker; returns an :class:`AsyncResult`."""
        with self._lock:
            self._check_running()
            result: ApplyResult[T] = ApplyResult(self, callback, error_callback)
        try:
            future = self._executor.submit(func, *tuple(args), **(kwds or {}))
        except BaseException:
            self._untrack(result)
            raise
        future.add_done_callback(lambda done: self._settle(result, done))
        return result

    def _settle(self, result: ApplyResult[Any], future: Future[Any]) -> None:
        try:
            value = future.result()
        except BaseException as exc:
            self._notify(result._finish, None, exc)
        else:
            self._notify(result._finish, value, None)

    # -- map ------------------------------------------------------------------

    def map(
        self, func: Callable[[Any], T], iterable: Iterable[Any], chunksize: int | None = None
    ) -> list[T]:
        """``list(map(func, iterable))`` in parallel; blocks until every result is in."""
        return self._map_async(func, iterable, chunksize, False, None, None).get()

    def map_async(
        self,
        func: Callable[[Any], T],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        callback: Callable[[list[T]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> MapResult[T]:
        """Like :meth:`map`, returning a :class:`MapResult` at once."""
        return self._map_async(func, iterable, chunksize, False, callback, error_callback)

    def starmap(
        self,
        func: Callable[..., T],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
    ) -> list[T]:
        """Like :meth:`map`, unpacking each item as arguments: ``func(*item)``."""
        return self._map_async(func, iterable, chunksize, True, None, None).get()

    def starmap_async(
        self,
        func: Callable[..., T],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[list[T]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> MapResult[T]:
        """Like :meth:`starmap`, returning a :class:`MapResult` at once."""
        return self._map_async(func, iterable, chunksize, True, callback, error_callback)

    def _map_async(
        self,
        func: Callable[..., T],
        iterable: Iterable[Any],
        chunksize: int | None,
        star: bool,
        callback: Callable[[list[T]], object] | None,
        error_callback: Callable[[BaseException], object] | None,
    ) -> MapResult[T]:
        self._check_running()
        items: Sequence[Any] = (
            iterable if isinstance(iterable, list | tuple | range) else list(iterable)
        )
        if star:
            items = [tuple(args) for args in items]
        if chunksize is None:
            # The standard library's rule: about four chunks per worker.
            chunksize, extra = divmod(len(items), self._processes * 4)
            if extra:
                chunksize += 1
        _check_chunksize(chunksize, allow_zero=not items)
        chunks = [list(items[i : i + chunksize]) for i in range(0, len(items), chunksize or 1)]
        with self._lock:
            self._check_running()
            result: MapResult[T] = MapResult(
                self, len(items), len(chunks), callback, error_callback
            )
        for index, chunk in enumerate(chunks):
            try:
                future = self._executor.submit(_run_chunk, func, chunk, star)
            except BaseException as exc:
                # e.g. a SerializationError: this chunk fails; later ones are not sent.
                failed: Future[list[Any]] = Future()
                failed.set_exception(exc)
                for rest in range(index, len(chunks)):
                    result._chunk_done(rest, failed)
                break
            future.add_done_callback(functools.partial(result._chunk_done, index))
        return result

    # -- imap -----------------------------------------------------------------

    def imap(
        self, func: Callable[[Any], T], iterable: Iterable[Any], chunksize: int = 1
    ) -> IMapIterator[T]:
        """A lazy ``map``: results in input order as they arrive."""
        return self._imap(func, iterable, chunksize, ordered=True)

    def imap_unordered(
        self, func: Callable[[Any], T], iterable: Iterable[Any], chunksize: int = 1
    ) -> IMapIterator[T]:
        """Like :meth:`imap`, in completion order."""
        return self._imap(func, iterable, chunksize, ordered=False)

    def _imap(
        self, func: Callable[[Any], T], iterable: Iterable[Any], chunksize: int, ordered: bool
    ) -> IMapIterator[T]:
        self._check_running()
        _check_chunksize(chunksize, allow_zero=False)
        source = _Stoppable(iterable)
        run = self._executor.map(
            _Tagged(func), source, chunksize=chunksize, ordered=ordered, on_error="return"
        )
        with self._lock:
            self._check_running()
            return IMapIterator(self, run, source)

    # -- lifecycle --------------------------------------------------------------

    def close(self) -> None:
        """Accept no more work; the workers exit once the queued work is done (see join)."""
        with self._lock:
            if self._state == _RUN:
                self._state = _CLOSE

    def terminate(self) -> None:
        """Stop the workers now; unfinished results fail with ``WorkerCrashedError``."""
        with self._lock:
            self._state = _TERMINATE
            iterators = [r for r in self._outstanding if isinstance(r, IMapIterator)]
            self._unclean.update(iterators)
        for iterator in iterators:
            iterator.abort()
        self._executor.kill_workers()
        self._finalizer.detach()
        self._stop_handler(wait_for_work=False)

    def join(self) -> None:
        """Wait for the outstanding work and the workers to finish (after close/terminate)."""
        if self._state == _RUN:
            raise ValueError("Pool is still running; call close() or terminate() first")
        with self._lock:
            while self._outstanding:
                self._idle.wait()
        if self._state == _CLOSE:
            self._executor.shutdown(wait=True)
            self._finalizer.detach()
        self._stop_handler(wait_for_work=True)

    def _stop_handler(self, *, wait_for_work: bool) -> None:
        with self._lock:
            handler, self._handler = self._handler, None
            self._handler_stopped = True
        if handler is None:
            return
        self._callbacks.put(None)
        if handler is not threading.current_thread():
            handler.join(timeout=None if wait_for_work else 10.0)

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.terminate()

    def __reduce__(self) -> tuple[Any, ...]:
        raise NotImplementedError(
            "pool objects cannot be passed between processes or pickled; "
            "create the Pool in the process that uses it"
        )

    def __repr__(self) -> str:
        return (
            f"<procession.Pool state={self._state} processes={self._processes} "
            f"backend={self._executor.backend.name!r}>"
        )


def _check_chunksize(chunksize: Any, *, allow_zero: bool) -> None:
    if isinstance(chunksize, bool) or not isinstance(chunksize, int):
        raise TypeError(f"chunksize must be a positive int, got {chunksize!r}")
    if chunksize < 1 and not (allow_zero and chunksize == 0):
        raise ValueError(f"Chunksize must be 1+, not {chunksize}")


def _handle_results(
    callbacks: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None],
) -> None:
    while (entry := callbacks.get()) is not None:
        fn, args = entry
        fn(*args)
    # Results that arrive after the pool stopped still become ready (without callbacks
    # queued behind the stop marker being lost): drain what is left.
    while True:
        try:
            entry = callbacks.get_nowait()
        except queue.Empty:
            return
        if entry is not None:
            entry[0](*entry[1])


def _kill_executor(executor: Executor) -> None:
    executor.kill_workers()
