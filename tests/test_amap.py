"""procession.amap on every backend: order, laziness, stopping, errors, a free event loop."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

import procession
from procession import pools
from procession.backends.registry import get_backend_class
from procession.errors import RemoteTraceback

T = TypeVar("T")

WORKERS = 2
# Backends that run each task inside submit(), on the calling thread: nothing
# runs concurrently there, so completion order is input order.
INLINE_BACKENDS = {"serial", "example-inline"}


def workers_for(backend_name: str) -> int:
    """WORKERS, or fewer where the backend cannot run that many (serial: 1)."""
    limit = get_backend_class(backend_name).max_workers
    return WORKERS if limit is None else min(WORKERS, limit)


def double(x: int) -> int:
    return 2 * x


def fail_on_three(x: int) -> int:
    if x == 3:
        raise KeyError(f"bad item {x}")
    return x


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def mark_and_sleep(args: tuple[str, int, float]) -> int:
    """Write <dir>/<x>.start (holding the pid), sleep, then write <dir>/<x>.done."""
    folder, x, seconds = args
    _write(Path(folder, f"{x}.start"), str(os.getpid()))
    time.sleep(seconds)
    _write(Path(folder, f"{x}.done"), str(os.getpid()))
    return x


def _write(path: Path, text: str) -> None:
    # Renamed into place, so a reader never sees the file empty.
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    os.replace(partial, path)


def _count(folder: Path, suffix: str) -> int:
    return len(list(folder.glob(f"*.{suffix}")))


def run_async(main: Callable[[], Awaitable[T]], limit: float = 60.0) -> T:
    """asyncio.run with a bound, so a hang fails the test instead of freezing it."""

    async def bounded() -> T:
        return await asyncio.wait_for(main(), limit)

    return asyncio.run(bounded())


async def collect(iterator: AsyncIterator[T]) -> list[T]:
    return [item async for item in iterator]


def _amap_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("procession-amap")]


@pytest.fixture(autouse=True)
def no_leftover_amap_threads() -> Iterator[None]:
    """Every test ends with its pump and stop threads gone (they are daemons: check)."""
    before = set(_amap_threads())
    yield
    deadline = time.monotonic() + 20.0

    def left() -> list[threading.Thread]:
        return [t for t in _amap_threads() if t not in before]

    while left() and time.monotonic() < deadline:
        time.sleep(0.05)
    stacks = {
        t.name: "".join(traceback.format_stack(sys._current_frames()[t.ident]))
        for t in left()
        if t.ident in sys._current_frames()
    }
    assert not left(), f"amap threads left running: {stacks}"


async def _wait_until(condition: Callable[[], bool], limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit}s waiting for {what}")
        await asyncio.sleep(0.02)


# -- results ----------------------------------------------------------------------


@pytest.mark.parametrize("chunksize", ["auto", 3])
def test_ordered_results(backend_name: str, chunksize: int | str) -> None:
    data = list(range(200))
    got = run_async(
        lambda: collect(
            procession.amap(
                double,
                data,
                backend=backend_name,
                workers=workers_for(backend_name),
                chunksize=chunksize,
            )
        )
    )
    assert got == [2 * x for x in data]


def test_unordered_yields_in_completion_order(backend_name: str) -> None:
    # Item 0 is slow; the others finish while it runs and must not wait for it.
    durations = [1.0] + [0.01] * 6
    got = run_async(
        lambda: collect(
            procession.amap(
                nap,
                durations,
                backend=backend_name,
                workers=workers_for(backend_name),
                chunksize=1,
                ordered=False,
            )
        )
    )
    assert sorted(got) == sorted(durations)
    if backend_name not in INLINE_BACKENDS:
        # Ordered output would start with the slow item.  (Dask may queue a fast
        # item behind it on the same worker, so "last" is too strong.)
        assert got[0] == 0.01 and got.index(1.0) >= len(durations) // 2, got


def test_empty_input_and_async_source(backend_name: str) -> None:
    async def nothing() -> AsyncIterator[int]:
        return
        yield  # pragma: no cover

    async def main() -> tuple[list[int], list[int]]:
        plain = await collect(
            procession.amap(double, [], backend=backend_name, workers=workers_for(backend_name))
        )
        empty = await collect(procession.amap(double, nothing(), backend=backend_name))
        return plain, empty

    assert run_async(main) == ([], [])


def test_async_source_is_read_lazily_on_the_loop(
    backend_name: str, request: pytest.FixtureRequest
) -> None:
    known_stop_bugs(request, backend_name)
    pulled = 0
    source_threads: set[int] = set()

    async def numbers() -> AsyncIterator[int]:
        nonlocal pulled
        n = 0
        while True:  # infinite: only a lazy reader can finish
            pulled += 1
            source_threads.add(threading.get_ident())
            await asyncio.sleep(0)
            yield n
            n += 1

    async def main() -> tuple[list[int], int, int]:
        got = []
        async for y in procession.amap(
            double, numbers(), backend=backend_name, workers=workers_for(backend_name), chunksize=2
        ):
            got.append(y)
            if len(got) == 10:
                break
        at_break = pulled
        await asyncio.sleep(0.5)
        return got, at_break, pulled

    loop_thread = threading.get_ident()  # asyncio.run runs the loop on this thread
    got, at_break, later = run_async(main)
    assert got == [2 * x for x in range(10)]
    # The window: 2 chunks per worker in flight plus a few buffered batches.
    assert at_break <= 10 + 2 * 2 * WORKERS + 2 * 8, at_break
    assert later <= at_break + 2 * WORKERS * 2, (at_break, later)
    assert source_threads == {loop_thread}


def test_async_source_read_ahead_keeps_order_and_errors(backend_name: str) -> None:
    # Items the source has ready are fetched in one hop; those behind an await,
    # the end and an error must still come in their place.
    async def mixed(fail_at: int | None) -> AsyncIterator[int]:
        for n in range(60):
            if n % 7 == 3:
                await asyncio.sleep(0.001)
            if n == fail_at:
                raise OSError(f"the feed broke at {n}")
            yield n

    async def main() -> tuple[list[int], list[int], BaseException | None]:
        whole = await collect(
            procession.amap(double, mixed(None), backend=backend_name, chunksize=4)
        )
        got: list[int] = []
        error = None
        try:
            async for y in procession.amap(double, mixed(45), backend=backend_name, chunksize=4):
                got.append(y)
        except OSError as exc:
            error = exc
        return whole, got, error

    whole, got, error = run_async(main)
    assert whole == [2 * n for n in range(60)]
    assert got == [2 * n for n in range(45)]
    assert error is not None and "broke at 45" in str(error)


def test_fast_async_source_is_read_ahead_a_bounded_amount(
    backend_name: str, request: pytest.FixtureRequest
) -> None:
    known_stop_bugs(request, backend_name)
    pulled = 0

    async def endless() -> AsyncIterator[int]:
        nonlocal pulled
        n = 0
        while True:  # never waits: every item is ready at once
            pulled += 1
            yield n
            n += 1

    async def main() -> tuple[list[int], int]:
        got = []
        async for y in procession.amap(double, endless(), backend=backend_name, chunksize=2):
            got.append(y)
            if len(got) == 10:
                break
        await asyncio.sleep(0.5)
        return got, pulled

    got, total = run_async(main)
    assert got == [2 * x for x in range(10)]
    # The window and buffered batches, plus at most one read-ahead batch.
    assert total <= 10 + 2 * 2 * WORKERS + 2 * 8 + 64, total


def test_async_source_waiting_for_results_does_not_deadlock(backend_name: str) -> None:
    # A conversation: the next request comes only after the previous answer
    # arrived.  The source pauses while its item is being worked on, so amap must
    # deliver results while it waits for input.
    answered = asyncio.Event()

    async def requests() -> AsyncIterator[int]:
        for n in range(5):
            answered.clear()
            yield n
            await answered.wait()

    async def main() -> list[int]:
        got = []
        async for y in procession.amap(
            double, requests(), backend=backend_name, workers=workers_for(backend_name)
        ):
            got.append(y)
            answered.set()
        return got

    assert run_async(main) == [0, 2, 4, 6, 8]


def test_async_source_error_reaches_the_consumer(backend_name: str) -> None:
    async def broken() -> AsyncIterator[int]:
        yield 1
        yield 2
        raise OSError("the feed went away")

    async def main() -> list[int]:
        got = []
        with pytest.raises(OSError, match="the feed went away"):
            async for y in procession.amap(double, broken(), backend=backend_name, chunksize=1):
                got.append(y)
        return got

    assert run_async(main) == [2, 4]


# -- errors -----------------------------------------------------------------------


def test_exception_keeps_type_and_remote_traceback(backend_name: str) -> None:
    async def main() -> tuple[list[int], BaseException]:
        got = []
        try:
            async for y in procession.amap(
                fail_on_three,
                range(10),
                backend=backend_name,
                workers=workers_for(backend_name),
                chunksize=1,
            ):
                got.append(y)
        except KeyError as exc:
            return got, exc
        raise AssertionError("no KeyError raised")

    got, exc = run_async(main)
    assert got == [0, 1, 2]
    assert "bad item 3" in str(exc)
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "fail_on_three" in str(exc.__cause__)


def test_on_error_return(backend_name: str) -> None:
    got = run_async(
        lambda: collect(
            procession.amap(
                fail_on_three,
                range(6),
                backend=backend_name,
                workers=workers_for(backend_name),
                on_error="return",
            )
        )
    )
    assert got[:3] == [0, 1, 2] and got[4:] == [4, 5]
    assert isinstance(got[3], KeyError)
    assert isinstance(got[3].__cause__, RemoteTraceback)


def test_timeout_kills_a_late_item(process_backend_name: str) -> None:
    # On Dask, this MapRun is made on the pump thread (its capabilities come
    # from the cluster): the timeout must still apply.
    got = run_async(
        lambda: collect(
            procession.amap(
                nap,
                [0.01, 30.0, 0.01],
                backend=process_backend_name,
                workers=WORKERS,
                timeout=3.0,
                on_error="return",
            )
        ),
        limit=90,
    )
    assert got[0] == 0.01 and got[2] == 0.01
    assert isinstance(got[1], procession.TaskTimeoutError), got


@pytest.mark.parametrize(
    "options",
    [
        {"chunksize": 0},
        {"chunksize": "big"},
        {"ordered": "yes"},
        {"on_error": "ignore"},
        {"retries": -1},
        {"timeout": -1},
        {"workers": 0},
        {"serializer": "no-such-serializer"},
    ],
    ids=repr,
)
def test_bad_options_raise_at_call_time_like_map(options: dict[str, Any]) -> None:
    # No event loop here: amap() must check before anything is awaited.
    with pytest.raises(Exception) as from_map:
        procession.map(double, [1], backend="threads", **options)
    with pytest.raises(type(from_map.value), match=re.escape(str(from_map.value))):
        procession.amap(double, [1], backend="threads", **options)


def test_bad_inputs_raise_at_call_time() -> None:
    with pytest.raises(TypeError, match="iterable or an async iterable"):
        procession.amap(double, 5, backend="threads")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be callable"):
        procession.amap(42, [1], backend="threads")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot stop a running task"):
        procession.amap(nap, [1.0], backend="threads", timeout=1)


def test_dask_options_checked_without_starting_the_cluster() -> None:
    # Making a MapRun for Dask may start or query its cluster: amap() checks
    # what it can on the spot and leaves the cluster alone.
    pytest.importorskip("distributed")
    backend = procession.create_backend("dask", workers=1)
    try:
        with pytest.raises(ValueError, match="chunksize must be"):
            procession.amap(double, [1], backend=backend, chunksize=0)
        with pytest.raises(ValueError, match="timeout must be > 0"):
            procession.amap(double, [1], backend=backend, timeout=-1)
        with pytest.raises(TypeError, match="must be callable"):
            procession.amap(42, [1], backend=backend)  # type: ignore[arg-type]
        procession.amap(double, [1], backend=backend, timeout=5)
        assert not backend.started
    finally:
        backend.shutdown()


# -- stopping -----------------------------------------------------------------------


LOKY_REQUEUE = (
    "loky backend: kill_task() replaces the whole executor and re-queues the other "
    "tasks handed to it, whose futures can no longer be cancelled, so MapRun.abort(kill=True) "
    "leaves them running for nobody (also with procession.map; backends/loky.py)"
)


def known_stop_bugs(request: pytest.FixtureRequest, backend_name: str) -> None:
    """Mark the backends whose stopping is broken outside amap (timing-dependent)."""
    reason = {"loky": LOKY_REQUEUE}.get(backend_name)
    if reason is not None:
        request.applymarker(pytest.mark.xfail(strict=False, reason=reason))


def test_break_stops_reading_and_sending(
    backend_name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    known_stop_bugs(request, backend_name)
    items = [(str(tmp_path), x, 0.1) for x in range(200)]

    async def main() -> tuple[int, int]:
        got = 0
        async for _ in procession.amap(
            mark_and_sleep,
            items,
            backend=backend_name,
            workers=workers_for(backend_name),
            chunksize=1,
        ):
            got += 1
            if got == 3:
                break
        # The iterator is closed by the loop once the `async for` lets go of it.
        await asyncio.sleep(1.0)
        settled = _count(tmp_path, "start")
        await asyncio.sleep(1.0)
        return settled, _count(tmp_path, "start")

    settled, later = run_async(main)
    assert settled == later, "tasks kept being sent after the consumer left"
    assert settled <= 3 + 2 * WORKERS + WORKERS, settled


def test_aclose_ends_the_iterator(backend_name: str, request: pytest.FixtureRequest) -> None:
    known_stop_bugs(request, backend_name)

    async def main() -> list[int]:
        iterator = procession.amap(
            double, range(10_000), backend=backend_name, workers=workers_for(backend_name)
        )
        first = [await anext(iterator), await anext(iterator)]
        await iterator.aclose()
        with pytest.raises(StopAsyncIteration):
            await anext(iterator)
        return first

    assert run_async(main) == [0, 2]


def test_cancelling_the_consumer_kills_running_work(
    process_backend_name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if process_backend_name == "loky":
        request.applymarker(pytest.mark.xfail(strict=True, reason=LOKY_REQUEUE))
    items = [(str(tmp_path), x, 60.0) for x in range(20)]
    # A backend of its own: a task left running by mistake must not hold up
    # the warm pool the other tests share.
    backend = procession.create_backend(process_backend_name, workers=WORKERS)

    async def consume() -> None:
        async for _ in procession.amap(mark_and_sleep, items, backend=backend, chunksize=1):
            raise AssertionError("a 60 s task finished")

    def start_pids() -> set[int]:
        return {int(p.read_text()) for p in tmp_path.glob("*.start")}

    async def main() -> tuple[float, set[int]]:
        task = asyncio.create_task(consume())
        await _wait_until(lambda: _count(tmp_path, "start") >= WORKERS, 60, "both workers busy")
        running = start_pids()
        cancelled_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        took = time.monotonic() - cancelled_at
        await _wait_until(
            lambda: not any(_alive(pid) for pid in running), 20, f"workers {running} killed"
        )
        # Nothing starts again for nobody (a re-queued task would write a new pid).
        await asyncio.sleep(2.0)
        return took, {pid for pid in start_pids() if _alive(pid)}

    try:
        took, still_running = run_async(main, limit=120)
    finally:
        backend.shutdown(wait=False, kill=True)
    assert took < 5.0, f"the consumer took {took:.1f}s to stop"
    assert not still_running, f"tasks run on for nobody in worker pids {still_running}"
    assert _count(tmp_path, "done") == 0
    # No task was sent after the cancellation: only the window's.
    assert _count(tmp_path, "start") <= 2 * WORKERS


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_cancelling_the_consumer_stops_sending(
    backend_name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    known_stop_bugs(request, backend_name)
    items = [(str(tmp_path), x, 0.1) for x in range(200)]

    async def consume(got: list[int]) -> None:
        async for y in procession.amap(
            mark_and_sleep,
            items,
            backend=backend_name,
            workers=workers_for(backend_name),
            chunksize=1,
        ):
            got.append(y)

    async def main() -> tuple[int, int, int]:
        got: list[int] = []
        task = asyncio.create_task(consume(got))
        await _wait_until(lambda: len(got) >= 2, 60, "two results")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(1.0)
        settled = _count(tmp_path, "start")
        await asyncio.sleep(1.0)
        return len(got), settled, _count(tmp_path, "start")

    received, settled, later = run_async(main)
    assert settled == later, "tasks kept being sent after the cancellation"
    assert settled <= received + 2 * WORKERS + WORKERS + 2, (received, settled)


def test_loop_closing_while_the_async_source_waits_does_not_hang() -> None:
    # The pump thread waits on the loop for the next input item; the loop then
    # ends (asyncio.run cancels the consumer).  Neither side may wait forever.
    async def never() -> AsyncIterator[int]:
        await asyncio.Event().wait()
        yield 0  # pragma: no cover

    async def main() -> None:
        iterator = procession.amap(double, never(), backend="threads", workers=WORKERS)
        asyncio.create_task(collect(iterator))  # noqa: RUF006 (left for asyncio.run to cancel)
        await asyncio.sleep(0.3)

    started = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - started < 10


# -- the event loop stays free ------------------------------------------------------


def test_event_loop_keeps_ticking_while_workers_run(backend_name: str) -> None:
    task_seconds = 1.0

    async def main() -> list[float]:
        ticks: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            while not done.is_set():
                ticks.append(time.monotonic())
                await asyncio.sleep(0.02)

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0.1)
        results = await collect(
            procession.amap(
                nap, [task_seconds] * 2, backend=backend_name, workers=workers_for(backend_name)
            )
        )
        done.set()
        await ticking
        assert results == [task_seconds] * 2
        return ticks

    ticks = run_async(main)
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    # A blocked loop would show a gap of a whole task (1 s) or more.
    assert max(gaps) < task_seconds / 2, f"the loop stalled for {max(gaps):.2f}s"
    assert len(ticks) >= 10


# -- single calls: an Executor's futures ------------------------------------------


def test_executor_submit_with_wrap_future(backend_name: str) -> None:
    backend = pools.shared_backend(backend_name, workers_for(backend_name))

    async def main() -> tuple[int, BaseException]:
        with procession.Executor(backend=backend) as ex:
            value = await asyncio.wrap_future(ex.submit(double, 21))
            try:
                await asyncio.wrap_future(ex.submit(fail_on_three, 3))
            except KeyError as exc:
                return value, exc
        raise AssertionError("no KeyError raised")

    value, exc = run_async(main)
    assert value == 42
    assert isinstance(exc.__cause__, RemoteTraceback)


# -- typing -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_async_for_infers_the_result_type(tmp_path: Path) -> None:
    snippet = tmp_path / "typed_amap.py"
    snippet.write_text(
        "import procession\n"
        "def length(word: str) -> int:\n"
        "    return len(word)\n"
        "async def main() -> None:\n"
        "    async for y in procession.amap(length, ['a', 'bb']):\n"
        "        reveal_type(y)\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--follow-imports=silent",
            "--cache-dir",
            str(tmp_path / "cache"),
            str(snippet),
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
    # mypy before 1.16 writes "builtins.int", later ones "int".
    assert re.search(r'Revealed type is "(builtins\.)?int"', done.stdout), done.stdout + done.stderr
