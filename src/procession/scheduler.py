"""The scheduler: chunking, the in-flight window, ordering, retries, timeouts.

It lives in the parent process and is written once for every backend.  The
options arrive validated (:mod:`procession.options`); the envelopes are made
and read by :mod:`procession.protocol`; a backend only moves their bytes.

    iterable ──► read a chunk ──► protocol.encode_task ──► Backend.submit(task bytes)
       ▲  full, or what came in               │                   │
       │  LINGER_SECONDS (slow sources)       │          TaskFuture[result bytes]
       │  only while the window has room      ▼                   ▼
    consumer ◄── emit (ordered: by input  ◄── protocol.decode_result; crashed chunks
                 position; unordered: as      go back item by item for retries=
                 chunks complete)             (always sent, window or not); kill
                                              tasks over timeout=

The window bounds chunks that are submitted or finished-but-not-yet-emitted,
so memory stays flat for an input of any length, and a slow consumer throttles
reading.  ``chunksize="auto"`` grows chunks until each takes about
``TARGET_CHUNK_SECONDS`` of worker time, and never makes them so large that
the tail of a known-length input starves workers.  An input given as a
:class:`TimedSource` (a Pipeline stage's channel) is never waited on while
results are due; :meth:`MapRun.abort` stops a run from any thread.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, wait
from dataclasses import dataclass, field
from typing import Any

from procession import protocol
from procession.backends.base import Backend, TaskFuture, settle_future
from procession.errors import (
    RemoteTraceback,
    SerializationError,
    TaskTimeoutError,
    WorkerCrashedError,
)
from procession.options import MapOptions
from procession.protocol import encode_function
from procession.serialization import shm
from procession.serialization.adapters import track_stateful_values
from procession.serialization.diagnostics import diagnose
from procession.serialization.serializers import Serializer

__all__ = [
    "IDLE",
    "MapRun",
    "TimedSource",
    "settle_future",
    "submit_call",
]

TARGET_CHUNK_SECONDS = 0.02
# How much a chunk may grow from one measurement to the next: one odd first
# item must not produce a huge chunk.
MAX_GROWTH = 16
# An absolute cap keeps read-ahead memory bounded for tiny tasks on huge inputs.
MAX_AUTO_CHUNK = 50_000
# Without a known length, an unstarted task's deadline cannot be computed; poll.
POLL_SECONDS = 0.05
# A chunk is sent when it is full or when reading it has taken this long, so a
# slow source's first result arrives after about one item period, not one chunk.
LINGER_SECONDS = 0.02
# A task over its timeout= whose future is still unsettled this long after the
# kill is killed again.
KILL_AGAIN_SECONDS = 2.0

#: What :meth:`TimedSource.read` returns when no item came within its timeout.
IDLE: Any = type("Idle", (), {"__repr__": lambda self: "IDLE"})()


class TimedSource(ABC):
    """An input the scheduler can wait on with a time limit (a queue, a channel).

    Give one to :class:`MapRun` instead of a plain iterable when the input may
    pause for long: the scheduler then keeps delivering finished results while
    it waits for more input, instead of blocking inside ``next()``.

    Example::

        class QueueSource(TimedSource):
            def __init__(self, q): self.q = q
            def read(self, timeout):
                try:
                    item = self.q.get(timeout=timeout)
                except queue.Empty:
                    return IDLE
                if item is None:
                    raise StopIteration
                return item
    """

    @abstractmethod
    def read(self, timeout: float | None) -> Any:
        """The next item; ``IDLE`` if none came within ``timeout`` seconds (None: wait
        as long as it takes); raise StopIteration at the end."""

    def __iter__(self) -> Iterator[Any]:
        while True:
            try:
                item = self.read(None)
            except StopIteration:
                return
            if item is not IDLE:
                yield item


@dataclass
class Chunk:
    """Contiguous input items [start, start + len(items))."""

    start: int
    items: list[Any]
    attempts: int = 0
    submitted_at: float = 0.0
    timed_out: bool = False
    killed_at: float = 0.0
    # Shared-memory segments of this chunk's large buffers (released when it is done).
    lease: shm.arena.Lease | None = None

    def indices(self) -> tuple[int, ...]:
        return tuple(range(self.start, self.start + len(self.items)))


@dataclass
class Outcome:
    """What came back for a chunk: values, and exceptions by relative position."""

    chunk: Chunk
    values: list[Any]
    errors: dict[int, BaseException] = field(default_factory=dict)


# Per-item time learned for each function (by digest), so the next map of the
# same function starts at the right chunk size instead of ramping up again.
_learned_per_item: OrderedDict[bytes, float] = OrderedDict()
_LEARNED_LIMIT = 256
_learned_lock = threading.Lock()


class AutoChunker:
    """Chooses chunk sizes from measured worker time per item."""

    def __init__(
        self, fixed: int | None, workers: int, length: int | None, key: bytes = b""
    ) -> None:
        self.fixed = fixed
        self.workers = workers
        self.length = length
        self.key = key
        self.per_item: float | None = _learned_per_item.get(key) if key else None
        # A remembered estimate is trusted at once; a fresh one grows step by step.
        self.largest = MAX_AUTO_CHUNK if self.per_item is not None else 1

    def next_size(self, consumed: int) -> int:
        if self.fixed is not None:
            return self.fixed
        if self.per_item is None:
            return 1
        size = int(TARGET_CHUNK_SECONDS / max(self.per_item, 1e-9))
        size = max(1, min(size, self.largest * MAX_GROWTH, MAX_AUTO_CHUNK))
        if self.length is not None:
            # Keep at least two chunks per worker in the tail so none idles.
            fair = math.ceil(max(self.length - consumed, 1) / (2 * self.workers))
            size = min(size, fair)
        self.largest = max(self.largest, size)
        return size

    def record(self, items: int, seconds: float) -> None:
        if self.fixed is not None or items <= 0:
            return
        sample = seconds / items
        self.per_item = sample if self.per_item is None else 0.5 * self.per_item + 0.5 * sample
        if self.key:
            with _learned_lock:
                _learned_per_item[self.key] = self.per_item
                _learned_per_item.move_to_end(self.key)
                if len(_learned_per_item) > _LEARNED_LIMIT:
                    _learned_per_item.popitem(last=False)


class MapRun:
    """One ``map`` call: a lazy iterator of results over ``backend``."""

    def __init__(
        self,
        backend: Backend,
        fn: Callable[..., Any],
        iterable: Iterable[Any],
        *,
        serializer: Serializer,
        star: bool = False,
        options: MapOptions | None = None,
        on_abort: Callable[[], None] | None = None,
        **option_values: Any,
    ) -> None:
        if options is None:
            options = MapOptions(**option_values)
        elif option_values:
            raise TypeError("pass either options= or option keywords to MapRun, not both")
        options.check_backend(backend)
        self.options = options
        self._timed: TimedSource | None = iterable if isinstance(iterable, TimedSource) else None
        try:
            self._source: Iterator[Any] = iter(iterable)
        except TypeError:
            raise TypeError(
                f"map() needs an iterable of inputs, got {type(iterable).__name__}"
            ) from None
        self._source_idle = False
        self._source_slow = False  # the last read stopped at the linger time
        self._length: int | None
        try:
            self._length = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            self._length = None
        self._backend = backend
        self._serializer = serializer
        # Large buffers go through shared memory on same-machine process backends,
        # or to the backend's own store (Dask, Ray): see shm.arena_for.
        self._arena = shm.arena_for(backend, stable_source=isinstance(iterable, (list, tuple)))
        try:
            self._fn = encode_function(fn, serializer, arena=self._arena)
        except BaseException:
            self._arena.close()
            raise
        if self._arena.active:  # a run dropped without being iterated frees its segments too
            weakref.finalize(self, self._arena.close)
        self._run_id = protocol.new_run_id()
        self._star = star
        self._chunker = AutoChunker(
            options.fixed_chunksize, backend.workers, self._length, self._fn.digest
        )
        self._ordered = options.ordered
        self._timeout = options.timeout
        self._retries = options.retries
        self._stop_on_error = options.on_error == "raise"
        self._window = max(2 * backend.workers, 2)
        self._progress = options.progress
        self._on_abort = on_abort
        self._consumed = 0
        self._exhausted = False
        self._input_error: BaseException | None = None
        self._pending: dict[TaskFuture, Chunk] = {}
        self._aborted = False
        self._left_running: list[TaskFuture] = []
        # Settled by abort() to wake the loop's wait(): a future cancelled before it
        # started counts as done there only once its backend acknowledges it.
        self._wakeup: Future[None] = Future()
        # The loop yields whole chunks of results; chain.from_iterable flattens
        # them in C, so the per-item cost of iterating is that of a list.
        self._batches: Generator[Iterator[Any], None, None] = self._run()
        self._flat: Iterator[Any] = itertools.chain.from_iterable(self._batches)

    def __iter__(self) -> Iterator[Any]:
        return self._flat

    def __next__(self) -> Any:
        return next(self._flat)

    def batches(self) -> Iterator[Iterator[Any]]:
        """The results a chunk at a time (for bridges such as ``amap`` that hand
        results over in bulk); each batch lets go of a result as it is yielded.
        Use either this or plain iteration, not both."""
        return self._batches

    def close(self) -> None:
        """Stop reading input and cancel in-flight work (from the consuming thread)."""
        self._batches.close()

    def abort(self, *, kill: bool = False) -> None:
        """Stop this run from any thread; the iterator then ends without more results.

        No more input is read and queued tasks are cancelled.  With ``kill=True``
        tasks already running are stopped too, by killing (and replacing) their
        workers on backends that can (``capabilities.kill``); otherwise they
        finish and their results are dropped.

        Example::

            run = procession.map(slow, items)
            threading.Timer(5, run.abort, kwargs={"kill": True}).start()
            partial = list(run)
        """
        self._aborted = True
        with contextlib.suppress(Exception):
            self._wakeup.set_result(None)
        can_kill = kill and self._backend.capabilities.kill
        for future in [*self._pending, *self._left_running]:
            if not future.cancel() and can_kill and not future.done():
                self._backend.kill_task(future)

    def __enter__(self) -> MapRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- reading and sending ------------------------------------------------

    def _read_chunk(self, *, may_block: bool) -> Chunk | None:
        """Read the next chunk: full, or what arrived within ``LINGER_SECONDS``.

        A sized input (list, range) cannot stall, so it is sliced at C speed.  An
        iterator is read in growing slices until the chunk is full or reading it
        has taken ``LINGER_SECONDS``: a slow source sends small chunks at once
        instead of filling one sized for a fast function.  A :class:`TimedSource`
        is never waited on while results are due (``may_block=False``).
        """
        size = self._chunker.next_size(self._consumed)
        items: list[Any] = []
        self._source_idle = self._source_slow = False
        try:
            # extend() keeps the items read before the source raised.
            if self._timed is not None:
                ended = self._read_timed(items, size, may_block)
            elif self._length is not None:
                items.extend(itertools.islice(self._source, size))
                ended = len(items) < size
            else:
                ended = self._read_lingering(items, size)
        except Exception as exc:
            ended = True
            self._input_error = exc
        if ended:
            self._exhausted = True
        if not items:
            return None
        chunk = Chunk(self._consumed, items)
        self._consumed += len(items)
        return chunk

    def _read_lingering(self, items: list[Any], size: int) -> bool:
        """Read up to ``size`` items, stopping early once reading took the linger time.

        Returns whether the source ended.
        """
        started = time.monotonic()
        step = 1
        while len(items) < size:
            want = min(step, size - len(items))
            before = len(items)
            items.extend(itertools.islice(self._source, want))
            if len(items) - before < want:
                return True
            elapsed = time.monotonic() - started
            if elapsed >= LINGER_SECONDS:
                self._source_slow = True
                return False
            # Grow the slice, but not past what the source delivers in the time left.
            affordable = len(items) / max(elapsed, 1e-9) * (LINGER_SECONDS - elapsed)
            step = max(1, min(2 * step, int(affordable)))
        return False

    def _read_timed(self, items: list[Any], size: int, may_block: bool) -> bool:
        assert self._timed is not None
        deadline: float | None = None
        while len(items) < size:
            if deadline is None:
                timeout = None if may_block else 0.0
            else:
                timeout = max(deadline - time.monotonic(), 0.0)
            try:
                item = self._timed.read(timeout)
            except StopIteration:
                return True
            if item is IDLE:
                self._source_idle = not items
                return False
            items.append(item)
            if deadline is None:
                deadline = time.monotonic() + LINGER_SECONDS
        return False

    def _send(self, chunk: Chunk, ready: dict[int, Outcome]) -> None:
        try:
            with track_stateful_values() as seen:
                items_bytes, chunk.lease = self._arena.dumps_leased(self._serializer, chunk.items)
            if seen.count and len(chunk.items) > 1:
                # Pickle sends a repeated object once: the same generator given as
                # two items would reach the second one used up.  Values with state
                # travel one item per task, each rebuilt as it is in the parent.
                self._arena.release(chunk.lease)
                for offset, item in enumerate(chunk.items):
                    self._send(Chunk(chunk.start + offset, [item], chunk.attempts), ready)
                return
        except Exception as exc:
            if len(chunk.items) > 1:
                # Find the culprit: send the others, fail only it.
                for offset, item in enumerate(chunk.items):
                    self._send(Chunk(chunk.start + offset, [item], chunk.attempts), ready)
                return
            root = "args" if self._star else "item"
            error = diagnose(
                chunk.items[0], self._serializer, root=root, exc=exc, index=chunk.start
            )
            error.__cause__ = exc
            ready[chunk.start] = Outcome(chunk, [None], {0: error})
            return
        task = protocol.encode_task(
            self._serializer,
            self._run_id,
            self._fn,
            items_bytes,
            star=self._star,
            stop_on_error=self._stop_on_error,
        )
        chunk.submitted_at = time.monotonic()
        self._pending[_submit(self._backend, self._arena, task, chunk.lease)] = chunk

    # -- receiving ----------------------------------------------------------

    def _receive(self, future: TaskFuture, chunk: Chunk, retry: deque[Chunk]) -> Outcome | None:
        """Decode a finished task; None when its chunk was queued for a retry."""
        try:
            data = future.result()
        except CancelledError:
            data = None
            error: BaseException = WorkerCrashedError(
                f"the task for items {_span(chunk)} was cancelled by the backend",
                items=chunk.indices(),
            )
        except WorkerCrashedError as exc:
            data = None
            error = exc
        except BaseException as exc:
            data = None
            error = exc
        if data is None:
            if chunk.timed_out:
                return self._all_failed(
                    chunk,
                    TaskTimeoutError(
                        f"item {chunk.start} ran longer than timeout={self._timeout}s; "
                        f"its worker was stopped and replaced",
                        index=chunk.start,
                        timeout=self._timeout,
                    ),
                )
            if isinstance(error, WorkerCrashedError):
                if chunk.attempts < self._retries:
                    # Retry item by item so one poisonous item cannot sink the rest.
                    for offset, item in enumerate(chunk.items):
                        retry.append(Chunk(chunk.start + offset, [item], chunk.attempts + 1))
                    return None
                error = _crash_for(chunk, error, self._retries)
            return self._all_failed(chunk, error)

        result = protocol.decode_result(
            data, self._serializer, what=f"items {_span(chunk)}", arena=self._arena
        )
        if result.task_error is not None:
            error = result.task_error
            if isinstance(error, SerializationError) and error.index is None:
                error.index = chunk.start
            return self._all_failed(chunk, error)
        self._chunker.record(len(result.values), result.seconds)
        for position, failure in result.errors.items():
            if isinstance(failure, SerializationError) and failure.index is None:
                # The worker knew the position only within its chunk.
                failure.index = chunk.start + position
                failure.args = (f"{failure} (input item {failure.index})", *failure.args[1:])
        return Outcome(chunk, result.values, result.errors)

    @staticmethod
    def _all_failed(chunk: Chunk, error: BaseException) -> Outcome:
        return Outcome(
            chunk, [None] * len(chunk.items), dict.fromkeys(range(len(chunk.items)), error)
        )

    def _emit(self, outcome: Outcome, bar: Any) -> Iterator[Iterator[Any]]:
        """Yield the chunk's results as one iterator; raise at the first failure if asked."""
        values, errors = outcome.values, outcome.errors
        if errors:
            first = min(errors)
            if self._stop_on_error:
                # The worker stopped at its first failure: nothing past it exists.
                if first:
                    yield _draining(values[:first])
                if bar is not None:
                    bar.update(first)
                raise errors[first]
            values = [errors.get(i, value) for i, value in enumerate(values)]
        count = len(values)
        yield _draining(values)
        if bar is not None:
            bar.update(count)

    # -- the loop -----------------------------------------------------------

    def _wait_seconds(self) -> float | None:
        if self._timeout is None:
            return None
        now = time.monotonic()
        nearest = POLL_SECONDS
        for future, chunk in self._pending.items():
            # A task already killed for its timeout waits for its worker's death,
            # not in a busy loop.
            if future.started_at is not None and not chunk.timed_out:
                nearest = min(nearest, future.started_at + self._timeout - now)
        return max(nearest, 0.0)

    def _enforce_timeouts(self) -> None:
        if self._timeout is None:
            return
        now = time.monotonic()
        for future, chunk in list(self._pending.items()):
            started = future.started_at
            if started is None or future.done():
                continue
            if not chunk.timed_out and now - started > self._timeout:
                chunk.timed_out = True
                chunk.killed_at = now
                self._backend.kill_task(future)
            elif chunk.timed_out and now - chunk.killed_at > KILL_AGAIN_SECONDS:
                # The kill did not land (the task moved between workers meanwhile,
                # say): ask again rather than wait forever.
                chunk.killed_at = now
                self._backend.kill_task(future)

    def _run(self) -> Generator[Iterator[Any], None, None]:
        bar = _progress_bar(self._length) if self._progress else None
        try:
            yield from self._loop(bar)
        except KeyboardInterrupt as interrupt:
            # A real Ctrl-C stops the pool at once.  A KeyboardInterrupt that a task
            # raised (it carries the worker's traceback) is that task's exception:
            # the pool that reported it is healthy and stays warm.
            if self._on_abort is not None and not isinstance(interrupt.__cause__, RemoteTraceback):
                self._on_abort()
            raise
        finally:
            for future in self._pending:
                future.cancel()
            # Running tasks finish for nobody unless abort(kill=True) stops them later.
            self._left_running = [f for f in self._pending if not f.done()]
            # Removes this map's segments, whatever happened (and late results' ones).
            self._arena.close(self._pending)
            self._pending.clear()
            if bar is not None:
                bar.close()

    def _loop(self, bar: Any) -> Iterator[Iterator[Any]]:
        self._backend.start()
        ready: dict[int, Outcome] = {}
        retry: deque[Chunk] = deque()
        next_index = 0
        while not self._aborted:
            # Items waiting for a retry always go out, window or not: in ordered mode
            # the window may be full of later results that wait for exactly them.
            while retry:
                self._send(retry.popleft(), ready)
            while len(self._pending) + len(ready) < self._window:
                if self._exhausted:
                    break
                chunk = self._read_chunk(may_block=not self._pending and not ready)
                if chunk is None:
                    break
                self._send(chunk, ready)
                if self._source_idle or self._source_slow:
                    break  # deliver what finished before waiting on the source again

            if self._ordered:
                while next_index in ready:
                    outcome = ready.pop(next_index)
                    next_index += len(outcome.chunk.items)
                    yield from self._emit(outcome, bar)
            else:
                while ready:
                    _, outcome = ready.popitem()
                    yield from self._emit(outcome, bar)

            if not self._pending and not retry:
                if not self._exhausted:
                    continue  # the window drained: read more input
                if self._input_error is not None:
                    raise self._input_error
                return
            timeout = self._wait_seconds()
            if self._source_idle and not self._exhausted:
                # The source may deliver meanwhile: look again soon.
                timeout = POLL_SECONDS if timeout is None else min(timeout, POLL_SECONDS)
            elif self._source_slow and not self._exhausted:
                timeout = 0.0  # reading the slow source is what paces the loop
            waitables: list[Future[Any]] = [*self._pending, self._wakeup]
            done, _ = wait(waitables, timeout=timeout, return_when=FIRST_COMPLETED)
            if self._aborted:
                return
            for future in done:
                task_future: TaskFuture = future  # type: ignore[assignment]
                chunk = self._pending.pop(task_future)
                # Its large arguments are no longer needed (a retry writes its own).
                self._arena.release(chunk.lease)
                chunk.lease = None
                received = self._receive(task_future, chunk, retry)
                if received is not None:
                    ready[chunk.start] = received
            self._enforce_timeouts()


def _submit(
    backend: Backend, arena: shm.InBand, task: bytes, lease: shm.arena.Lease | None
) -> TaskFuture:
    """Hand ``task`` to ``backend``, with the stored buffers it names, if any."""
    attachments = arena.attachments(lease)
    if attachments:
        return backend.submit_with_buffers(task, attachments)
    return backend.submit(task)


def _draining(values: list[Any]) -> Iterator[Any]:
    """Iterate ``values`` in order, letting go of each one as it is yielded.

    The consumer may hold large results: once it has moved on, nothing here
    keeps them alive.  (C-level map over list.pop, so it costs what a list
    iterator costs.)
    """
    values.reverse()
    return map(values.pop, itertools.repeat(-1, len(values)))


def _span(chunk: Chunk) -> str:
    last = chunk.start + len(chunk.items) - 1
    return str(chunk.start) if last == chunk.start else f"{chunk.start}..{last}"


def _crash_for(chunk: Chunk, error: WorkerCrashedError, retries: int) -> WorkerCrashedError:
    tried = f" after {chunk.attempts + 1} attempts" if chunk.attempts else ""
    advice = "" if retries else "; pass retries=N to re-run items lost to a crash"
    # with_context keeps the error's class (WorkerMemoryError) and details.
    return error.with_context(
        f"{error}; lost input items {_span(chunk)}{tried}{advice}", items=chunk.indices()
    )


def _progress_bar(total: int | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="item", dynamic_ncols=True)


def submit_call(
    backend: Backend,
    serializer: Serializer,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Future[Any]:
    """Run ``fn(*args, **kwargs)`` on ``backend``; a plain concurrent.futures.Future.

    A function that is not callable raises TypeError here; everything that goes
    wrong with this one call after that (arguments or function that do not
    serialize, a crash, a result that cannot be rebuilt) fails the future.
    """
    if not callable(fn):
        raise TypeError(f"the function to submit must be callable, got {type(fn).__name__}")
    user_future: Future[Any] = Future()
    arena = shm.arena_for(backend)  # large buffers: one arena per call, closed with it
    try:
        encoded = encode_function(fn, serializer, role="submit", arena=arena)
        try:
            # Leased, not pinned: the whole arena closes with this call.
            items_bytes, lease = arena.dumps_leased(serializer, [(args, kwargs)])
        except Exception as exc:
            raise diagnose((args, kwargs), serializer, root="(args, kwargs)", exc=exc) from exc
    except SerializationError as error:
        arena.close()
        # As ProcessPoolExecutor does: the error belongs to this call's future.
        user_future.set_running_or_notify_cancel()
        user_future.set_exception(error)
        return user_future
    except BaseException:
        arena.close()
        raise
    task = protocol.encode_task(
        serializer, protocol.new_run_id(), encoded, items_bytes, star=True, stop_on_error=True
    )
    del args, kwargs  # a finished future keeps no reference to its arguments
    try:
        backend.start()
        task_future = _submit(backend, arena, task, lease)
    except BaseException:
        arena.close()
        raise

    def relay(done: Future[bytes]) -> None:
        try:
            _relay(done)
        finally:
            arena.close()

    def _relay(done: Future[bytes]) -> None:
        if user_future.cancelled():
            return
        try:
            data = done.result()
        except CancelledError:
            if user_future.cancel():
                with contextlib.suppress(RuntimeError):
                    user_future.set_running_or_notify_cancel()
            else:
                settle_future(
                    user_future,
                    exc=WorkerCrashedError(f"backend {backend.name!r} cancelled this running task"),
                )
            return
        except BaseException as transport_error:
            settle_future(user_future, exc=transport_error)
            return
        result = protocol.decode_result(data, serializer, what="the submitted call", arena=arena)
        if result.task_error is not None:
            settle_future(user_future, exc=result.task_error)
        elif result.errors:
            settle_future(user_future, exc=result.errors[min(result.errors)])
        else:
            settle_future(user_future, value=result.values[0])

    def forward_cancel(done: Future[Any]) -> None:
        if done.cancelled():
            task_future.cancel()
            # concurrent.futures.wait() counts a cancelled future as done only once
            # its executor acknowledges the cancellation.
            with contextlib.suppress(RuntimeError):
                done.set_running_or_notify_cancel()

    def mark_running(_: TaskFuture) -> None:
        # As in concurrent.futures: a started task can no longer be cancelled.
        with contextlib.suppress(RuntimeError):
            user_future.set_running_or_notify_cancel()

    # The executor stops exactly its own tasks through it (terminate_workers()).
    user_future.task_future = task_future  # type: ignore[attr-defined]
    user_future.add_done_callback(forward_cancel)
    task_future.add_start_callback(mark_running)
    task_future.add_done_callback(relay)
    return user_future
