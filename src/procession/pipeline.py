"""Pipeline: streaming stages, each on its own backend, linked by bounded queues.

Example::

    pipe = (procession.Pipeline(lines)
              .map(parse, workers=2)
              .filter(keep)
              .map(score, backend="threads", workers=8)
              .batch(100))
    with pipe.run(backend="process") as results:
        for batch in results:
            ...

Every stage runs in its own thread of the calling process; the threads are
linked by bounded channels::

    source ─► [chan 0] ─► stage 1 ─► [chan 1] ─► stage 2 ─► ··· ─► [chan n] ─► consumer
    (thread)   bounded    (thread)    bounded    (thread)                     (your loop)
                             │
                             ▼  a map stage (or a filter / flat_map given backend= or
                          MapRun   workers=) drives the scheduler over its backend;
                             │    other stages run inline in their thread
                             ▼
                          Backend ─► workers

- Back-pressure: a stage blocks on ``put`` while its output channel is full,
  and the scheduler reads its input only while its window has room, so a slow
  stage throttles everything upstream and an infinite source needs bounded memory.
- Data flows down, in order: a stage emits what it produced, then one end
  marker, either END or a Failure carrying an exception.  A stage that fails
  first emits everything it produced before the failure, so the consumer
  raises the error at its place in the output, as the sequential composition
  of the stages would.
- Cancellation goes up at once: a failing stage closes the channels above
  it.  A failure reaching the consumer, ``close()`` or leaving the ``with``
  block closes every channel (a blocked ``put``/``get`` raises ``_Cancelled``),
  cancels queued tasks, kills tasks still running after a short grace period
  where the backend can, and waits for the threads.  Dropping the iterator
  does the same from a finalizer, without waiting or killing.
"""

from __future__ import annotations

import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar

from procession.api import resolve_backend
from procession.backends.base import Backend
from procession.errors import PipelineError, RemoteTraceback
from procession.options import MapOptions, check_workers
from procession.protocol import encode_function
from procession.scheduler import IDLE, MapRun, TimedSource
from procession.serialization.serializers import Serializer, get_serializer

__all__ = ["DEFAULT_MAXSIZE", "Pipeline", "PipelineRun"]

T = TypeVar("T")
U = TypeVar("U")

#: Items a stage's output channel holds before the stage blocks.
DEFAULT_MAXSIZE = 64
# On close, running tasks get this long to finish before they are killed
# (on backends that can kill), so an early ``break`` rarely costs a worker.
GRACE_SECONDS = 0.5
JOIN_SECONDS = 10.0

StageKind = Literal["map", "filter", "flat_map", "batch"]


class _Cancelled(BaseException):
    """Raised inside a pipeline thread when the run shuts down.

    A BaseException so that the scheduler, which treats an ``Exception`` from
    its input as the input's own error, lets it through.
    """


class _End:
    def __repr__(self) -> str:
        return "<end of stream>"


_END = _End()
_IDLE = object()  # a timed get found nothing


@dataclass(frozen=True)
class _Failure:
    error: BaseException


class _ChannelSource(TimedSource):
    """A stage's input channel as the scheduler reads it; keeps the end marker."""

    def __init__(self, channel: _Channel) -> None:
        self.channel = channel
        self.ended: Any = None

    def read(self, timeout: float | None) -> Any:
        item = self.channel.get(timeout)
        if item is _IDLE:
            return IDLE
        if item is _END or isinstance(item, _Failure):
            self.ended = item
            raise StopIteration
        return item


class _Channel:
    """A bounded FIFO from one thread to one other that either side can cancel.

    The reader takes everything queued at once into a private buffer, so a
    busy stream costs one lock round trip per batch rather than per item (the
    stage holds at most ``maxsize`` taken items besides the ``maxsize`` queued).
    """

    def __init__(self, maxsize: int) -> None:
        self._items: deque[Any] = deque()
        self._taken: deque[Any] = deque()  # the reader's; no lock needed
        self._maxsize = maxsize
        self._cond = threading.Condition(threading.Lock())
        self._closed = False

    def put(self, item: Any, *, final: bool = False) -> None:
        # The end marker may exceed maxsize by one: it carries no data, and a
        # stage must be able to finish without waiting for its consumer.
        with self._cond:
            while not final and len(self._items) >= self._maxsize and not self._closed:
                self._cond.wait()
            if self._closed:
                raise _Cancelled
            self._items.append(item)
            if len(self._items) == 1:
                self._cond.notify_all()  # the reader may be waiting for it

    def get(self, timeout: float | None = None) -> Any:
        """The next item; ``_IDLE`` if none came within ``timeout`` seconds."""
        if self._closed:
            raise _Cancelled
        if self._taken:
            return self._taken.popleft()
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait_for(lambda: self._items or self._closed, timeout)
            if self._closed:
                raise _Cancelled
            if not self._items:
                return _IDLE
            if len(self._items) >= self._maxsize:
                self._cond.notify_all()  # the writer may be waiting for room
            self._items, self._taken = self._taken, self._items
        return self._taken.popleft()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._items.clear()
            self._cond.notify_all()


@dataclass(frozen=True)
class _Stage:
    kind: StageKind
    fn: Callable[..., Any] | None = None
    size: int = 0
    backend: str | Backend | None = None
    workers: int | None = None
    chunksize: int | str = "auto"
    ordered: bool | None = None
    timeout: float | None = None
    serializer: str | Serializer | None = None
    maxsize: int | None = None

    @property
    def on_backend(self) -> bool:
        """Whether the stage's function runs on a backend (else inline, in its thread)."""
        if self.kind == "map":
            return True
        if self.kind == "batch":
            return False
        return self.backend is not None or self.workers is not None

    def describe(self, position: int) -> str:
        if self.kind == "batch":
            return f"stage {position} (batch({self.size}))"
        name = getattr(self.fn, "__qualname__", None) or type(self.fn).__name__
        return f"stage {position} ({self.kind} {name})"


class _KeepIf:
    """A filter predicate run in a worker: returns ``(keep, item or None)``."""

    def __init__(self, pred: Callable[[Any], Any]) -> None:
        self.pred = pred

    def __call__(self, item: Any) -> tuple[bool, Any]:
        if self.pred(item):
            return True, item
        return False, None


class _Expand:
    """A flat_map function run in a worker: its iterable comes back as a list."""

    def __init__(self, fn: Callable[[Any], Iterable[Any]]) -> None:
        self.fn = fn

    def __call__(self, item: Any) -> list[Any]:
        return list(self.fn(item))


def _check_callable(fn: object, method: str) -> None:
    if not callable(fn):
        raise TypeError(f"Pipeline.{method}() needs a callable, got {type(fn).__name__} {fn!r}")


def _check_maxsize(maxsize: object) -> int:
    if isinstance(maxsize, bool) or not isinstance(maxsize, int):
        raise TypeError(f"maxsize must be a positive int, got {maxsize!r}")
    if maxsize <= 0:
        raise ValueError(f"maxsize must be a positive int, got {maxsize}")
    return maxsize


def _check_backend(backend: object) -> None:
    if backend is not None and not isinstance(backend, str | Backend):
        raise TypeError(
            f"backend= must be a backend name or a procession.Backend, got {type(backend).__name__}"
        )


def _check_stage_options(
    *, chunksize: object, ordered: object, timeout: object, backend: object, workers: object
) -> None:
    """Reject what can be rejected before a backend is known (the rest at run())."""
    _check_backend(backend)
    check_workers(workers)
    if ordered is not None and not isinstance(ordered, bool):
        raise TypeError(f"ordered must be True, False or None (the run's choice), got {ordered!r}")
    # The same checks, and the same exceptions, as procession.map's.
    MapOptions(chunksize=chunksize, timeout=timeout)  # type: ignore[arg-type]


class _SourceState:
    """Shared by a Pipeline and every Pipeline built from it: the source runs once."""

    def __init__(self, iterable: Iterable[Any]) -> None:
        self.iterable = iterable
        self.lock = threading.Lock()
        self.ran = False


class Pipeline(Generic[T]):
    """Streaming stages over ``source``, each running concurrently with the others.

    Example::

        >>> pipe = (procession.Pipeline(range(10))
        ...           .map(lambda x: x * x, backend="threads")
        ...           .filter(lambda x: x % 2 == 0)
        ...           .batch(2))
        >>> list(pipe.run())
        [[0, 4], [16, 36], [64]]

    Each method returns a new Pipeline; nothing runs until :meth:`run`.  A
    ``map`` stage runs on a backend (its own ``backend=``/``workers=``, else
    the run's); ``filter`` and ``flat_map`` run inline in their stage's thread
    unless given ``backend=`` or ``workers=``; ``batch`` always runs inline.
    ``maxsize`` bounds each stage's output queue (default
    :data:`DEFAULT_MAXSIZE`, or the Pipeline's ``maxsize=``).
    """

    def __init__(self, source: Iterable[T], *, maxsize: int = DEFAULT_MAXSIZE) -> None:
        if not (isinstance(source, Iterable) or hasattr(source, "__getitem__")):
            raise TypeError(f"Pipeline() needs an iterable source, got {type(source).__name__}")
        self._source = _SourceState(source)
        self._stages: tuple[_Stage, ...] = ()
        self._maxsize = _check_maxsize(maxsize)

    def _then(self, stage: _Stage) -> Pipeline[Any]:
        if stage.maxsize is not None:
            _check_maxsize(stage.maxsize)
        new: Pipeline[Any] = Pipeline.__new__(Pipeline)
        new._source = self._source
        new._stages = (*self._stages, stage)
        new._maxsize = self._maxsize
        return new

    def _function_stage(
        self,
        kind: StageKind,
        fn: Callable[..., Any],
        *,
        workers: int | None,
        backend: str | Backend | None,
        chunksize: int | str,
        ordered: bool | None,
        timeout: float | None,
        serializer: str | Serializer | None,
        maxsize: int | None,
    ) -> Pipeline[Any]:
        _check_callable(fn, kind)
        _check_stage_options(
            chunksize=chunksize, ordered=ordered, timeout=timeout, backend=backend, workers=workers
        )
        if serializer is not None:
            get_serializer(serializer)  # fail now on an unknown name
        stage = _Stage(
            kind,
            fn,
            backend=backend,
            workers=workers,
            chunksize=chunksize,
            ordered=ordered,
            timeout=timeout,
            serializer=serializer,
            maxsize=maxsize,
        )
        if not stage.on_backend and (timeout is not None or chunksize != "auto"):
            raise ValueError(
                f"{kind}() runs inline unless given backend= or workers=, so timeout= and "
                f"chunksize= do not apply; pass backend= to run it on workers"
            )
        return self._then(stage)

    def map(
        self,
        fn: Callable[[T], U],
        *,
        workers: int | None = None,
        backend: str | Backend | None = None,
        chunksize: int | str = "auto",
        ordered: bool | None = None,
        timeout: float | None = None,
        serializer: str | Serializer | None = None,
        maxsize: int | None = None,
    ) -> Pipeline[U]:
        """Apply ``fn`` to every item on a backend (this stage's, else the run's).

        ``ordered=None`` follows ``run(ordered=...)``; ``timeout`` is per item,
        as in :func:`procession.map`.
        """
        return self._function_stage(
            "map",
            fn,
            workers=workers,
            backend=backend,
            chunksize=chunksize,
            ordered=ordered,
            timeout=timeout,
            serializer=serializer,
            maxsize=maxsize,
        )

    def filter(
        self,
        pred: Callable[[T], object],
        *,
        workers: int | None = None,
        backend: str | Backend | None = None,
        chunksize: int | str = "auto",
        ordered: bool | None = None,
        timeout: float | None = None,
        serializer: str | Serializer | None = None,
        maxsize: int | None = None,
    ) -> Pipeline[T]:
        """Keep the items for which ``pred`` is true.

        Inline (in the stage's thread) unless ``backend=`` or ``workers=`` is given.
        """
        return self._function_stage(
            "filter",
            pred,
            workers=workers,
            backend=backend,
            chunksize=chunksize,
            ordered=ordered,
            timeout=timeout,
            serializer=serializer,
            maxsize=maxsize,
        )

    def flat_map(
        self,
        fn: Callable[[T], Iterable[U]],
        *,
        workers: int | None = None,
        backend: str | Backend | None = None,
        chunksize: int | str = "auto",
        ordered: bool | None = None,
        timeout: float | None = None,
        serializer: str | Serializer | None = None,
        maxsize: int | None = None,
    ) -> Pipeline[U]:
        """Replace every item by the items of ``fn(item)``.

        Inline unless ``backend=`` or ``workers=`` is given (then each result is
        collected into a list in the worker, so it must be finite).
        """
        return self._function_stage(
            "flat_map",
            fn,
            workers=workers,
            backend=backend,
            chunksize=chunksize,
            ordered=ordered,
            timeout=timeout,
            serializer=serializer,
            maxsize=maxsize,
        )

    def batch(self, size: int, *, maxsize: int | None = None) -> Pipeline[list[T]]:
        """Group consecutive items into lists of ``size`` (the last may be shorter)."""
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"batch() size must be a positive int, got {size!r}")
        if size <= 0:
            raise ValueError(f"batch() size must be a positive int, got {size}")
        return self._then(_Stage("batch", size=size, maxsize=maxsize))

    def run(
        self,
        *,
        backend: str | Backend | None = None,
        ordered: bool = True,
        progress: bool = False,
    ) -> PipelineRun[T]:
        """Start every stage; returns an iterator of the last stage's output.

        ``backend`` is used by stages on a backend that name none;
        ``ordered=True`` keeps input order end to end, ``False`` lets items
        overtake in stages that do not set ``ordered=`` themselves.  The result
        is also a context manager: leaving the block (or ``close()``) stops
        every stage.  A pipeline runs once.
        """
        _check_backend(backend)
        if not isinstance(ordered, bool):
            raise TypeError(f"ordered must be True or False, got {ordered!r}")
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be True or False, got {progress!r}")
        with self._source.lock:
            if self._source.ran:
                raise PipelineError(
                    "this pipeline's source was already run (a Pipeline runs once, and so does "
                    "every Pipeline built from the same source); build a new "
                    "procession.Pipeline(source) to run again"
                )
            plans = [
                _plan(stage, position, backend, ordered)
                for position, stage in enumerate(self._stages, 1)
            ]
            try:
                source_iterator = iter(self._source.iterable)
            except TypeError as exc:
                raise TypeError(f"the pipeline's source is not iterable: {exc}") from None
            self._source.ran = True
        return PipelineRun(_Runner(source_iterator, plans, self._maxsize), progress=progress)

    def __repr__(self) -> str:
        stages = ", ".join(s.describe(i) for i, s in enumerate(self._stages, 1))
        return f"<Pipeline [{stages}]>"


@dataclass(frozen=True)
class _Plan:
    """A stage ready to run: backend resolved, function checked."""

    stage: _Stage
    where: str
    backend: Backend | None
    fn: Callable[..., Any] | None
    serializer: Serializer | None
    options: MapOptions


def _plan(stage: _Stage, position: int, run_backend: str | Backend | None, ordered: bool) -> _Plan:
    where = stage.describe(position)
    if not stage.on_backend:
        return _Plan(stage, where, None, stage.fn, None, MapOptions())
    assert stage.fn is not None
    chosen = resolve_backend(
        stage.backend if stage.backend is not None else run_backend, stage.workers
    )
    serializer = get_serializer(stage.serializer, chosen.default_serializer)
    stage_ordered = ordered if stage.ordered is None else stage.ordered
    options = MapOptions(chunksize=stage.chunksize, ordered=stage_ordered, timeout=stage.timeout)
    options.check_backend(chosen)
    fn: Callable[..., Any] = stage.fn
    if stage.kind == "filter":
        fn = _KeepIf(stage.fn)
    elif stage.kind == "flat_map":
        fn = _Expand(stage.fn)
    # Fail at run(), in the caller, when the function cannot be sent or the
    # backend cannot start; some backends (Ray) must also start in the main thread.
    encode_function(fn, serializer)
    chosen.start()
    return _Plan(stage, where, chosen, fn, serializer, options)


def _attach_traceback(exc: BaseException, where: str) -> BaseException:
    """Give an exception raised in a pipeline thread its traceback as ``__cause__``,
    as a worker's exception has, so every stage fails the same way."""
    if exc.__cause__ is None and not exc.__suppress_context__:
        text = "".join(traceback.format_exception(exc))
        exc.__cause__ = RemoteTraceback(f"in {where}:\n{text}")
    return exc


class _Runner:
    """The threads and channels of one run.  Holds no reference to the
    :class:`PipelineRun`, so dropping that iterator can cancel the run."""

    _counter = 0
    _counter_lock = threading.Lock()

    def __init__(self, source: Iterator[Any], plans: list[_Plan], maxsize: int) -> None:
        with _Runner._counter_lock:
            _Runner._counter += 1
            number = _Runner._counter
        self.plans = plans
        self.channels = [_Channel(maxsize)] + [
            _Channel(plan.stage.maxsize if plan.stage.maxsize is not None else maxsize)
            for plan in plans
        ]
        self.lock = threading.Lock()
        self.stopped = False
        self.runs: dict[int, MapRun] = {}  # stage position -> its scheduler run
        self.threads = [
            threading.Thread(
                target=self._source_main,
                args=(source,),
                name=f"procession-pipeline-{number}-source",
                daemon=True,
            )
        ]
        for position, plan in enumerate(plans, 1):
            self.threads.append(
                threading.Thread(
                    target=self._stage_main,
                    args=(position, plan),
                    name=f"procession-pipeline-{number}-stage{position}-{plan.stage.kind}",
                    daemon=True,
                )
            )
        for thread in self.threads:
            thread.start()

    @property
    def output(self) -> _Channel:
        return self.channels[-1]

    # -- threads --------------------------------------------------------------

    def _source_main(self, source: Iterator[Any]) -> None:
        out = self.channels[0]
        try:
            for item in source:
                out.put(item)
            out.put(_END, final=True)
        except _Cancelled:
            return
        except BaseException as exc:
            self._fail(0, _attach_traceback(exc, "the pipeline's source"))

    def _stage_main(self, position: int, plan: _Plan) -> None:
        try:
            if plan.backend is not None:
                end = self._run_on_backend(position, plan)
            else:
                end = self._run_inline(position, plan)
            self.channels[position].put(end, final=True)
        except _Cancelled:
            return
        except BaseException as exc:
            self._fail(position, _attach_traceback(exc, plan.where))

    def _fail(self, position: int, exc: BaseException) -> None:
        try:
            self.channels[position].put(_Failure(exc), final=True)
        except _Cancelled:
            pass
        # Nothing more will be read from upstream: stop it now.
        for channel in self.channels[:position]:
            channel.close()

    def _read(self, position: int, ended: list[Any]) -> Iterator[Any]:
        """Items from the previous channel; the end marker is left in ``ended``."""
        channel = self.channels[position - 1]
        while True:
            item = channel.get()
            if item is _END or isinstance(item, _Failure):
                ended.append(item)
                return
            yield item

    def _run_inline(self, position: int, plan: _Plan) -> Any:
        out = self.channels[position]
        ended: list[Any] = []
        stage, fn = plan.stage, plan.fn
        if stage.kind == "filter":
            assert fn is not None
            for item in self._read(position, ended):
                if fn(item):
                    out.put(item)
        elif stage.kind == "flat_map":
            assert fn is not None
            for item in self._read(position, ended):
                for value in fn(item):
                    out.put(value)
        else:
            batch: list[Any] = []
            for item in self._read(position, ended):
                batch.append(item)
                if len(batch) == stage.size:
                    out.put(batch)
                    batch = []
            # Upstream failed: drop the partial batch, as itertools.batched would.
            if batch and ended[0] is _END:
                out.put(batch)
        return ended[0]

    def _run_on_backend(self, position: int, plan: _Plan) -> Any:
        """Drive the scheduler over the stage's input channel.

        The channel is a :class:`TimedSource`: while upstream pauses, the
        scheduler keeps handing finished results downstream.
        """
        assert plan.backend is not None
        assert plan.fn is not None
        assert plan.serializer is not None
        out = self.channels[position]
        kind = plan.stage.kind
        source = _ChannelSource(self.channels[position - 1])
        run = MapRun(
            plan.backend,
            plan.fn,
            source,
            serializer=plan.serializer,
            options=plan.options,
        )
        with self.lock:
            self.runs[position] = run
        try:
            for value in run:
                if kind == "map":
                    out.put(value)
                elif kind == "filter":
                    if value[0]:
                        out.put(value[1])
                else:
                    for each in value:
                        out.put(each)
        finally:
            # Cancels what is queued; a task still running stays known to the run,
            # so shutdown() can kill it after the grace period.
            run.close()
        return source.ended

    # -- shutting down --------------------------------------------------------

    def cancel(self) -> None:
        """Stop every stage without waiting (safe from a finalizer)."""
        for channel in self.channels:
            channel.close()
        self._abort_runs(kill=False)

    def shutdown(self, *, kill: bool = False) -> None:
        """Stop every stage and wait for its thread; idempotent."""
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
        self.cancel()
        current = threading.current_thread()
        threads = [t for t in self.threads if t is not current]
        if kill:
            self._kill_running()
        deadline = time.monotonic() + GRACE_SECONDS
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        # Tasks still running after the grace period are killed where the backend
        # can: nobody will read their results.
        self._kill_running(after_grace=deadline)
        # Still waiting for running tasks: kill them where the backend can, again
        # and again, since a backend may hand a killed worker's other tasks to a
        # new worker.  On a backend that cannot kill (threads), the stage's
        # thread ends when its task returns; it is a daemon and holds nothing else.
        deadline = time.monotonic() + JOIN_SECONDS
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            self._kill_running()
            for thread in threads:
                thread.join(min(0.2, max(deadline - time.monotonic(), 0.0)))

    def _kill_running(self, *, after_grace: float | None = None) -> None:
        if after_grace is not None:
            time.sleep(max(after_grace - time.monotonic(), 0.0))
        self._abort_runs(kill=True)

    def _abort_runs(self, *, kill: bool) -> None:
        with self.lock:
            runs = list(self.runs.values())
        for run in runs:
            run.abort(kill=kill)


class PipelineRun(Generic[T]):
    """The output of :meth:`Pipeline.run`: an iterator and a context manager.

    Example::

        with pipe.run() as results:
            for item in results:
                if done(item):
                    break          # leaving the block stops every stage
    """

    def __init__(self, runner: _Runner, *, progress: bool = False) -> None:
        self._runner = runner
        self._finished = False
        self._bar: Any = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(unit="item", dynamic_ncols=True)
        # Dropping the iterator unfinished (``for x in pipe.run(): break``) stops the run.
        self._finalizer = weakref.finalize(self, runner.cancel)

    def __iter__(self) -> PipelineRun[T]:
        return self

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        try:
            item = self._runner.output.get()
        except _Cancelled:
            self._finish()
            raise StopIteration from None
        except BaseException:  # KeyboardInterrupt while waiting: stop now
            self._finish(kill=True)
            raise
        if item is _END:
            self._finish()
            raise StopIteration
        if isinstance(item, _Failure):
            self._finish()
            raise item.error
        if self._bar is not None:
            self._bar.update(1)
        result: T = item
        return result

    def _finish(self, *, kill: bool = False) -> None:
        self._finished = True
        self._finalizer.detach()
        try:
            self._runner.shutdown(kill=kill)
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def close(self) -> None:
        """Stop every stage (queued work is cancelled, running tasks stopped) and
        wait for the pipeline's threads to end."""
        if not self._finished:
            self._finish()

    def __enter__(self) -> PipelineRun[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
