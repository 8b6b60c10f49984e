"""asyncio: :func:`amap`, procession's whole map as an async iterator.

A :class:`~procession.scheduler.MapRun` is a blocking iterator, so a *pump*
thread drives it and hands whole result batches (one per chunk) to the
event loop; the loop thread only takes a lock for a moment and yields items.

    event loop thread                              pump thread ("procession-amap")
    ─────────────────                              ───────────────────────────────
    async for y in amap(fn, xs):                   for batch in MapRun (blocking):
      take every buffered batch ◄──── lock ──────    append it; wait while the buffer
      none yet: await a Future ◄─ call_soon_threadsafe ─ is full (back-pressure)
      yield the items one by one
    async source: anext() runs on the loop ◄─ run_coroutine_threadsafe ─ MapRun reads input
                                                   (a TimedSource: results keep
                                                   flowing while the source pauses)
    cancel / aclose() / break ──► stop: no more input, buffer closed,
                                  MapRun.abort(kill=True) from a helper thread

Nothing on the loop thread blocks or polls: the pump wakes the loop only when
the consumer is waiting (``call_soon_threadsafe``), and the loop wakes the pump
through a condition variable.  Stopping never waits for the pump either: the
work is killed behind the consumer's back (``capabilities.kill`` backends) or,
on in-process backends, running tasks finish and their results are dropped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
import types
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
)
from collections.abc import Iterator as IteratorABC
from typing import Any, TypeVar

from procession import api
from procession.backends.base import Backend, Capabilities
from procession.options import MapOptions, OnError
from procession.scheduler import IDLE, MapRun, TimedSource
from procession.serialization.diagnostics import check_picklable
from procession.serialization.serializers import Serializer, get_serializer

__all__ = ["amap"]

T = TypeVar("T")

# Result batches (one per chunk) the pump may hold for a consumer that is busy;
# with MapRun's own window this bounds the results held for a slow consumer.
MAX_BUFFERED_BATCHES = 8
# How often the helper thread repeats MapRun.abort() while the pump is still in
# the run: a chunk sent while the first abort ran must be stopped too.
REAP_SECONDS = 0.25


def amap(
    fn: Callable[..., T],
    iterable: Iterable[Any] | AsyncIterable[Any],
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
) -> AsyncGenerator[T, None]:
    """:func:`procession.map` for asyncio: an async iterator that never blocks the loop.

    Example::

        async def main() -> None:
            async for y in procession.amap(pow, [1, 2, 3], backend="threads"):
                print(y)

    ``iterable`` may be an ordinary iterable (read on a helper thread) or an
    async iterable (each item fetched on the loop), read lazily with the same
    bounded window as ``map``.  The options are ``map``'s and are checked here,
    before the first ``await``.  Cancelling the consuming task, ``aclose()``,
    or leaving ``async for`` by ``break`` stops the work: no more input is read
    and running tasks are killed on backends that can (their workers replaced).
    """
    options: dict[str, Any] = {
        "backend": backend,
        "workers": workers,
        "chunksize": chunksize,
        "ordered": ordered,
        "timeout": timeout,
        "retries": retries,
        "serializer": serializer,
        "progress": progress,
        "on_error": on_error,
    }
    source: _AsyncSource | None = None
    inputs: Iterable[Any]
    if isinstance(iterable, AsyncIterable):
        source = _AsyncSource(iterable)
        inputs = source
    elif isinstance(iterable, Iterable):
        inputs = iterable
    else:
        raise TypeError(
            f"amap() needs an iterable or an async iterable of inputs, "
            f"got {type(iterable).__name__}"
        )
    chosen = api.resolve_backend(backend, workers)
    if _builds_without_blocking(chosen):
        run = api.map(fn, inputs, **options)
        return _consume(lambda: run, source)
    # Making the MapRun would start or query this backend (a Dask cluster, say):
    # check here what can be checked without it, and make the run on the pump.
    _precheck(fn, chosen, options)
    return _consume(lambda: api.map(fn, inputs, **options), source)


def _builds_without_blocking(backend: Backend) -> bool:
    """Can MapRun() read ``workers`` and ``capabilities`` without I/O?

    The built-in pools keep both as plain attributes.  Dask computes them from
    its cluster, which may have to be started or asked first.
    """
    cls = type(backend)
    if isinstance(inspect.getattr_static(cls, "workers", None), property):
        return False
    return isinstance(inspect.getattr_static(cls, "capabilities", None), Capabilities)


def _precheck(fn: Callable[..., Any], backend: Backend, options: dict[str, Any]) -> None:
    """map()'s checks that need neither a started backend nor its capabilities.

    What the backend can honour (``MapOptions.check_backend``) is checked when
    the pump makes the run: that error is raised at the first ``await``.
    """
    MapOptions(
        chunksize=options["chunksize"],
        ordered=options["ordered"],
        timeout=options["timeout"],
        retries=options["retries"],
        on_error=options["on_error"],
        progress=options["progress"],
    )
    if not callable(fn):
        raise TypeError(f"the function to map must be callable, got {type(fn).__name__}")
    check_picklable(fn, get_serializer(options["serializer"], backend.default_serializer))


async def _consume(
    make_run: Callable[[], IteratorABC[Any]], source: _AsyncSource | None
) -> AsyncGenerator[Any, None]:
    loop = asyncio.get_running_loop()
    channel = _Channel(loop, source)
    if source is not None:
        source.bind(loop)
    pump = threading.Thread(
        target=channel.pump, args=(make_run,), name="procession-amap", daemon=True
    )
    pump.start()
    try:
        while True:
            taken = channel.take()
            if taken is None:
                return
            if isinstance(taken, asyncio.Future):
                await taken
                continue
            for batch in taken:
                for item in batch:
                    yield item
    finally:
        # Cancelled, closed, broken out of, or failed: stop whatever still runs.
        channel.stop(pump)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Channel:
    """Result batches from the pump thread to the loop; its state is under one lock."""

    def __init__(self, loop: asyncio.AbstractEventLoop, source: _AsyncSource | None) -> None:
        self._loop = loop
        self._source = source
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._batches: deque[Iterable[Any]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._finished = False
        self._error: BaseException | None = None
        self._stopping = False
        self._run: IteratorABC[Any] | None = None

    # -- the pump thread ----------------------------------------------------

    def pump(self, make_run: Callable[[], IteratorABC[Any]]) -> None:
        error: BaseException | None = None
        run: IteratorABC[Any] | None = None
        try:
            run = make_run()
            with self._lock:
                self._run = run
                stopping = self._stopping
            if not stopping:
                batches = run.batches() if isinstance(run, MapRun) else ([i] for i in run)
                for batch in batches:
                    if not self._put(batch):
                        break
        except BaseException as exc:
            error = exc
        finally:
            if run is not None:
                try:
                    with self._lock:
                        stopping = self._stopping
                    if stopping and isinstance(run, MapRun):
                        # Here the run is suspended, so its in-flight set is complete.
                        run.abort(kill=True)
                    close = getattr(run, "close", None)
                    if close is not None:
                        close()
                except BaseException as exc:
                    error = error or exc
            self._finish(error)

    def _put(self, batch: Iterable[Any]) -> bool:
        """Hand a batch over; False when nobody will read it."""
        with self._space:
            while len(self._batches) >= MAX_BUFFERED_BATCHES and not self._stopping:
                self._space.wait()
            if self._stopping:
                return False
            self._batches.append(batch)
            waiter, self._waiter = self._waiter, None
        return waiter is None or self._notify(waiter)

    def _finish(self, error: BaseException | None) -> None:
        with self._lock:
            self._finished = True
            self._error = error
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._notify(waiter)

    def _notify(self, waiter: asyncio.Future[None]) -> bool:
        try:
            self._loop.call_soon_threadsafe(_wake, waiter)
        except RuntimeError:
            # The loop is closed: nobody will ever read what comes next.
            with self._lock:
                self._stopping = True
            return False
        return True

    # -- the event loop thread ----------------------------------------------

    def take(self) -> list[Iterable[Any]] | asyncio.Future[None] | None:
        """Every buffered batch; else a future to await; None at the end."""
        with self._lock:
            if self._batches:
                taken = list(self._batches)
                self._batches.clear()
                self._space.notify()
                return taken
            if not self._finished:
                self._waiter = self._loop.create_future()
                return self._waiter
            error, self._error = self._error, None
        if error is not None:
            raise error
        return None

    def stop(self, pump: threading.Thread) -> None:
        """Stop reading input and the work in flight; never blocks the loop."""
        with self._lock:
            if self._finished:
                return
            self._stopping = True
            self._batches.clear()
            self._space.notify_all()
        if self._source is not None:
            self._source.stop()
        # MapRun.abort() may kill and replace workers, which takes a moment:
        # never on the loop thread.
        threading.Thread(
            target=self._reap, args=(pump,), name="procession-amap-stop", daemon=True
        ).start()

    def _reap(self, pump: threading.Thread) -> None:
        while pump.is_alive():
            with self._lock:
                run = self._run
            if isinstance(run, MapRun):
                run.abort(kill=True)
            pump.join(REAP_SECONDS)


_END = object()
# The most items of an async source fetched in one hop to the loop: the one
# MapRun asked for, then only those the source has ready without waiting.
READ_AHEAD = 64


class _Failure:
    """An exception the async source raised, delivered at its place in the input."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


@types.coroutine
def _resume(step: Generator[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """The rest of an ``anext()`` that suspended after its first step (as ``await`` would)."""
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:
            try:
                yielded = step.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = step.send(sent)
            except StopIteration as stop:
                return stop.value


async def _finish(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _next_now(iterator: AsyncIterator[Any]) -> tuple[bool, Any]:
    """(True, item) if ``anext(iterator)`` completes without waiting; else (False, rest).

    Raises StopAsyncIteration at the end, like ``anext``.
    """
    step = anext(iterator).__await__()
    try:
        yielded = step.send(None)
    except StopIteration as stop:
        return True, stop.value
    return False, _resume(step, yielded)


class _AsyncSource(TimedSource):
    """An async iterable as a :class:`~procession.scheduler.TimedSource` for the pump.

    A read the pump cannot serve from what it already holds is one hop to the
    loop, which awaits the next item and then takes every further item the
    source has ready without waiting (at most ``READ_AHEAD``), so a fast source
    costs one thread hop per batch, not per item, and a slow one is read
    exactly as lazily as an ordinary iterable.  The pump waits at most as long
    as MapRun asks, so results keep flowing while the source pauses (a
    connection waiting for its next request).  ``stop()`` cancels what is in
    flight on the loop, so the pump never waits on a loop that stopped
    listening.
    """

    def __init__(self, aiterable: AsyncIterable[Any]) -> None:
        self._aiterable = aiterable
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        # Pump side: items fetched and not yet read; the batch being fetched.
        self._ready: deque[Any] = deque()
        self._pending: concurrent.futures.Future[list[Any]] | None = None
        self._stopped = False
        # Loop side: the iterator, and an anext() that suspended while reading ahead.
        self._iterator: AsyncIterator[Any] | None = None
        self._carry: asyncio.Task[Any] | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    async def _fetch(self) -> list[Any]:
        """On the loop: the next item, then those ready at once, then maybe _END/_Failure."""
        if self._iterator is None:
            self._iterator = aiter(self._aiterable)
        items: list[Any] = []
        try:
            carry, self._carry = self._carry, None
            items.append(await (carry if carry is not None else anext(self._iterator)))
            while len(items) < READ_AHEAD:
                ready, value = _next_now(self._iterator)
                if not ready:
                    # It waits for something: let it finish as a task, for next time.
                    self._carry = asyncio.ensure_future(_finish(value))
                    self._carry.add_done_callback(_retrieve)
                    break
                items.append(value)
        except StopAsyncIteration:
            items.append(_END)
        except Exception as exc:
            items.append(_Failure(exc))
        return items

    def _cancel_carry(self) -> None:
        if self._carry is not None:
            self._carry.cancel()

    def read(self, timeout: float | None) -> Any:
        with self._lock:
            if self._stopped or self._loop is None:
                raise StopIteration
            if self._ready:
                return self._deliver(self._ready.popleft())
            future = self._pending
            if future is None:
                step = self._fetch()
                try:
                    future = asyncio.run_coroutine_threadsafe(step, self._loop)
                except RuntimeError:
                    step.close()  # the loop is closed: the input ends here
                    self._stopped = True
                    raise StopIteration from None
                # Kept across reads that time out: the same fetch is awaited next time.
                self._pending = future
        try:
            batch = future.result(timeout)
        except TimeoutError:
            return IDLE
        except concurrent.futures.CancelledError:
            if self._stopped:
                raise StopIteration from None
            raise
        finally:
            if future.done():
                with self._lock:
                    self._pending = None
        with self._lock:
            if self._stopped:
                raise StopIteration
            self._ready.extend(batch)
            return self._deliver(self._ready.popleft())

    def _deliver(self, item: Any) -> Any:
        """``item``, or the end or failure it stands for (lock held)."""
        if item is _END:
            self._ready.appendleft(_END)  # the end stays the end
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.exc
        return item

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._ready.clear()
            pending = self._pending
            loop = self._loop
        if pending is not None:
            pending.cancel()
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._cancel_carry)
            except RuntimeError:
                pass  # the loop is closed: it cancelled its tasks itself


def _retrieve(task: asyncio.Task[Any]) -> None:
    # A read-ahead nobody collects (the consumer left) must not log "never retrieved".
    if not task.cancelled():
        task.exception()
