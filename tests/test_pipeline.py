"""Pipeline: equals the sequential composition of its stages on every backend,
mixes backends, applies back-pressure, fails in order, and cleans up."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import procession
from procession.errors import PipelineError, RemoteTraceback, SerializationError
from procession.pipeline import Pipeline
from procession.workloads.sieve_pipeline import check_ranges, collect_primes

ROOT = Path(__file__).resolve().parent.parent
# A few examples per backend in CI (the suite runs on every backend); the
# `thorough` hypothesis profile gets its full count.
_profile_examples = settings.default.max_examples
FEW = 6 if _profile_examples <= 15 else _profile_examples
SOME = 4 if _profile_examples <= 15 else _profile_examples

# -- stage functions (module level: importable by workers of every backend) ----


def add_one(x: int) -> int:
    return x + 1


def triple(x: int) -> int:
    return 3 * x


def negate(x: int) -> int:
    return -x


def is_even(x: int) -> bool:
    return x % 2 == 0


def not_multiple_of_3(x: int) -> bool:
    return x % 3 != 0


def twice(x: int) -> list[int]:
    return [x, x]


def up_to_mod_3(x: int) -> range:
    return range(x % 3)


def pid_and(x: int) -> tuple[int, int]:
    return os.getpid(), x


def fail_at_7(x: int) -> int:
    if x == 7:
        raise ValueError(f"boom at {x}")
    return x


def pred_fail_at_7(x: int) -> bool:
    if x == 7:
        raise ValueError(f"boom at {x}")
    return True


def expand_fail_at_7(x: int) -> list[int]:
    if x == 7:
        raise ValueError(f"boom at {x}")
    return [x]


def source_fail_at_7() -> Iterator[int]:
    for x in range(20):
        if x == 7:
            raise ValueError(f"boom at {x}")
        yield x


def sleep_forever(x: int) -> int:
    time.sleep(60)
    return x


_release = threading.Event()
_consumer_got_one = threading.Event()


def waits_for_the_consumer(x: int) -> int:
    if x == 0:
        _consumer_got_one.wait(10)
    return x


def first_waits_for_fourth(x: int) -> int:
    # Same process on the threads backend: item 0 finishes only once item 3 ran.
    if x == 0:
        _release.wait(10)
    elif x >= 3:
        _release.set()
    return x


MAPS: dict[str, Callable[[int], int]] = {"add_one": add_one, "triple": triple, "negate": negate}
FILTERS: dict[str, Callable[[int], bool]] = {"is_even": is_even, "not3": not_multiple_of_3}
FLAT_MAPS: dict[str, Callable[[int], Any]] = {"twice": twice, "up_to_mod_3": up_to_mod_3}

# (kind, function name, on the backend?) — batch, if any, comes last.
stage_spec = st.one_of(
    st.tuples(st.just("map"), st.sampled_from(sorted(MAPS)), st.just(True)),
    st.tuples(st.just("filter"), st.sampled_from(sorted(FILTERS)), st.booleans()),
    st.tuples(st.just("flat_map"), st.sampled_from(sorted(FLAT_MAPS)), st.booleans()),
)


def build(
    source: list[int], specs: list[tuple[str, str, bool]], batch: int | None, backend: str
) -> Pipeline[Any]:
    pipe: Pipeline[Any] = Pipeline(source, maxsize=8)
    for kind, name, remote in specs:
        where = {"backend": backend} if remote else {}
        if kind == "map":
            pipe = pipe.map(MAPS[name], backend=backend)
        elif kind == "filter":
            pipe = pipe.filter(FILTERS[name], **where)
        else:
            pipe = pipe.flat_map(FLAT_MAPS[name], **where)
    if batch is not None:
        pipe = pipe.batch(batch)
    return pipe


def sequential(
    source: list[int], specs: list[tuple[str, str, bool]], batch: int | None
) -> list[Any]:
    items: Any = iter(source)
    for kind, name, _remote in specs:
        if kind == "map":
            items = map(MAPS[name], items)
        elif kind == "filter":
            items = filter(FILTERS[name], items)
        else:
            items = itertools.chain.from_iterable(map(FLAT_MAPS[name], items))
    out = list(items)
    if batch is not None:
        return [out[i : i + batch] for i in range(0, len(out), batch)]
    return out


def pipeline_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("procession-pipeline-")]


def wait_for_no_pipeline_threads(seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while pipeline_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pipeline_threads(), f"pipeline threads left running: {pipeline_threads()}"


@pytest.fixture(autouse=True)
def no_leftover_threads() -> Iterator[None]:
    """Fail a test that leaves a pipeline thread, or any non-daemon thread, behind.

    Warm backend pools (procession's, loky's, Dask's, Ray's) and tqdm's monitor
    keep daemon helper threads between calls by design; every thread a pipeline
    starts is named ``procession-pipeline-*``.
    """
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 10.0
    while True:
        extra = [
            t
            for t in set(threading.enumerate()) - before
            if t.is_alive() and (t.name.startswith("procession-pipeline-") or not t.daemon)
        ]
        if not extra or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert not extra, f"test left threads behind: {extra}"


# -- equals the sequential composition ---------------------------------------------


@settings(max_examples=FEW)
@given(
    source=st.lists(st.integers(-20, 20), max_size=25),
    specs=st.lists(stage_spec, max_size=4),
    batch=st.none() | st.integers(1, 4),
)
def test_pipeline_equals_sequential_composition(
    backend_name: str,
    source: list[int],
    specs: list[tuple[str, str, bool]],
    batch: int | None,
) -> None:
    pipe = build(source, specs, batch, backend_name)
    with pipe.run(backend=backend_name) as results:
        assert list(results) == sequential(source, specs, batch)


@settings(max_examples=SOME)
@given(
    source=st.lists(st.integers(-20, 20), max_size=25),
    specs=st.lists(stage_spec, max_size=3),
)
def test_unordered_is_a_permutation(
    backend_name: str, source: list[int], specs: list[tuple[str, str, bool]]
) -> None:
    pipe = build(source, specs, None, backend_name)
    got = list(pipe.run(backend=backend_name, ordered=False))
    assert sorted(got) == sorted(sequential(source, specs, None))


def test_no_stages_yields_the_source() -> None:
    assert list(Pipeline(iter(range(5))).run()) == [0, 1, 2, 3, 4]
    assert list(Pipeline([]).map(add_one, backend="threads").run()) == []


def test_unordered_lets_items_overtake() -> None:
    _consumer_got_one.clear()
    pipe = Pipeline(range(8)).map(waits_for_the_consumer, backend="threads", workers=2, chunksize=1)
    results = pipe.run(ordered=False)
    # Item 0 is held until the consumer received something: only overtaking
    # lets this first next() return (in order, it would wait for item 0).
    first = next(results)
    _consumer_got_one.set()
    rest = list(results)
    assert first != 0
    assert sorted([first, *rest]) == list(range(8))


def test_stage_ordered_overrides_the_run() -> None:
    _release.clear()
    pipe = Pipeline(range(8)).map(
        first_waits_for_fourth, backend="threads", workers=2, chunksize=1, ordered=True
    )
    assert list(pipe.run(ordered=False)) == list(range(8))


# -- mixed backends --------------------------------------------------------------


def test_mixed_backends_threads_then_processes(process_backend_name: str) -> None:
    pipe = (
        Pipeline(range(30))
        .map(triple, backend="threads", workers=2)
        .filter(is_even, backend="threads", workers=2)
        .map(pid_and, backend=process_backend_name)
        .flat_map(twice)
    )
    got = list(pipe.run())
    values = [x for _pid, x in got[::2]]
    assert values == [3 * x for x in range(30) if (3 * x) % 2 == 0]
    assert got[::2] == got[1::2]
    pids = {pid for pid, _ in got}
    assert os.getpid() not in pids  # the process stage ran elsewhere: items crossed over


def test_stage_serializer_is_used() -> None:
    # With plain pickle a lambda cannot be sent: the stage's serializer= is honoured.
    pipe = Pipeline(range(3)).map(lambda x: x, backend="threads", serializer="pickle")
    with pytest.raises(SerializationError):
        pipe.run()
    pipe = Pipeline(range(3)).map(add_one, backend="threads", serializer="pickle")
    assert list(pipe.run()) == [1, 2, 3]


# -- back-pressure ---------------------------------------------------------------


class CountingSource:
    """An infinite source that counts how many items were pulled from it."""

    def __init__(self) -> None:
        self.pulled = 0

    def __iter__(self) -> Iterator[int]:
        for x in itertools.count():
            self.pulled += 1
            yield x


@pytest.mark.timeout(30)
def test_back_pressure_bounds_an_infinite_source() -> None:
    source = CountingSource()
    pipe = (
        Pipeline(source, maxsize=4)
        .map(add_one, backend="threads", workers=2, chunksize=1)
        .filter(is_even)
        .batch(2)
    )
    consumed = 0
    with pipe.run() as results:
        for batch in results:
            assert batch == [4 * consumed + 2, 4 * consumed + 4]
            consumed += 1
            time.sleep(0.01)  # a slow consumer
            if consumed == 10:
                break
        time.sleep(0.3)  # time enough for an unbounded source to run far ahead
        ahead = source.pulled - 4 * consumed
        # Per channel: 4 queued + 4 taken by its reader + 1 in the writer's hand;
        # counted in source items (a kept item is 2 of them, a batch 4): about
        # 9 + 9 + 4 (the window: 2 * workers chunks of 1) + 9 + 9 * 2 + 9 * 4 = 85.
        # An unthrottled source would be hundreds of thousands ahead by now.
        assert ahead <= 90, f"source ran {ahead} items ahead of the consumer"
        pulled = source.pulled
        time.sleep(0.1)
        assert source.pulled == pulled  # and it stays there
    wait_for_no_pipeline_threads()


# -- errors in each position -----------------------------------------------------


ERROR_PIPES: dict[str, Callable[[str], Pipeline[Any]]] = {
    "source": lambda b: Pipeline(source_fail_at_7()).map(add_one, backend=b),
    "map": lambda b: Pipeline(range(20)).map(fail_at_7, backend=b).map(add_one, backend=b),
    "filter-inline": lambda b: Pipeline(range(20)).map(add_one, backend=b).filter(pred_fail_at_7),
    "filter-backend": lambda b: Pipeline(range(20)).filter(pred_fail_at_7, backend=b),
    "flat_map-inline": lambda b: Pipeline(range(20)).flat_map(expand_fail_at_7).map(add_one),
    "flat_map-backend": lambda b: Pipeline(range(20)).flat_map(expand_fail_at_7, backend=b),
}
EXPECTED_PREFIX = {
    "source": [1, 2, 3, 4, 5, 6, 7],
    "map": [1, 2, 3, 4, 5, 6, 7],
    "filter-inline": [1, 2, 3, 4, 5, 6],  # 7 = add_one(6) fails
    "filter-backend": [0, 1, 2, 3, 4, 5, 6],
    "flat_map-inline": [1, 2, 3, 4, 5, 6, 7],
    "flat_map-backend": [0, 1, 2, 3, 4, 5, 6],
}


@pytest.mark.parametrize("backend", ["threads", "process"])
@pytest.mark.parametrize("position", sorted(ERROR_PIPES))
def test_error_in_each_position(position: str, backend: str) -> None:
    got: list[Any] = []
    with pytest.raises(ValueError, match="boom at 7") as info:
        for item in ERROR_PIPES[position](backend).run(backend=backend):
            got.append(item)
    # Everything before the failing item arrived, in order, then the error itself.
    assert got == EXPECTED_PREFIX[position]
    assert type(info.value) is ValueError
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "boom at 7" in str(info.value.__cause__)
    if position == "source":
        assert "the pipeline's source" in str(info.value.__cause__)
    elif position.endswith("-inline"):
        kind = position.removesuffix("-inline")
        assert re.search(rf"in stage \d \({kind} \w+\):", str(info.value.__cause__))
    wait_for_no_pipeline_threads()


def test_upstream_failure_drops_the_partial_batch() -> None:
    # As itertools.batched would: complete batches, then the error.
    got: list[list[int]] = []
    with pytest.raises(ValueError, match="boom at 7"):
        for batch in Pipeline(source_fail_at_7()).batch(3).run():
            got.append(batch)
    assert got == [[0, 1, 2], [3, 4, 5]]


def test_a_backend_instance_per_stage() -> None:
    backend = procession.create_backend("threads", workers=3)
    try:
        pipe = Pipeline(range(10)).map(add_one, backend=backend).filter(is_even, backend=backend)
        assert list(pipe.run()) == [2, 4, 6, 8, 10]
        with pytest.raises(ValueError, match="workers"):
            Pipeline(range(3)).map(add_one, backend=backend, workers=2).run()
    finally:
        backend.shutdown()


@pytest.mark.timeout(30)
def test_error_stops_an_infinite_upstream() -> None:
    source = CountingSource()
    pipe = Pipeline(source, maxsize=4).map(add_one, backend="threads").map(fail_at_7)
    with pytest.raises(ValueError, match="boom at 7"):
        list(pipe.run(backend="threads"))
    wait_for_no_pipeline_threads()
    pulled = source.pulled
    time.sleep(0.1)
    assert source.pulled == pulled


# -- early close ------------------------------------------------------------------


def _infinite_pipe(backend: str) -> Pipeline[int]:
    return (
        Pipeline(itertools.count(), maxsize=4)
        .map(add_one, backend=backend)
        .filter(is_even)
        .flat_map(twice, backend=backend)
    )


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["break", "close", "with"])
def test_early_close_leaves_nothing_running(backend_name: str, how: str) -> None:
    if how == "break":
        for item in _infinite_pipe(backend_name).run(backend=backend_name):
            if item > 20:
                break
    elif how == "close":
        results = _infinite_pipe(backend_name).run(backend=backend_name)
        assert next(results) == 2
        results.close()
        assert list(results) == []  # closed: nothing more
    else:
        with _infinite_pipe(backend_name).run(backend=backend_name) as results:
            assert next(results) == 2
    wait_for_no_pipeline_threads()


@pytest.mark.timeout(30)
def test_close_stops_a_running_task(crash_backend_name: str) -> None:
    # A task that would run for a minute is killed when the run closes.
    results = Pipeline(range(2)).map(sleep_forever, backend=crash_backend_name).run()
    time.sleep(0.2)
    results.close()
    wait_for_no_pipeline_threads()


@pytest.mark.timeout(30)
def test_stage_timeout_is_per_item() -> None:
    pipe = Pipeline([1, 2]).map(sleep_forever, backend="process", timeout=0.5)
    with pytest.raises(procession.TaskTimeoutError):
        list(pipe.run())
    wait_for_no_pipeline_threads()


# -- building mistakes ---------------------------------------------------------------


def test_building_mistakes_are_named() -> None:
    pipe = Pipeline(range(3))
    with pytest.raises(TypeError, match=r"map\(\) needs a callable"):
        pipe.map(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"filter\(\) needs a callable"):
        pipe.filter(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch"):
        pipe.batch(0)
    with pytest.raises(TypeError, match="batch"):
        pipe.batch(2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="maxsize"):
        Pipeline(range(3), maxsize=0)
    with pytest.raises(ValueError, match="workers"):
        pipe.map(add_one, workers=0)
    with pytest.raises(ValueError, match="chunksize"):
        pipe.map(add_one, chunksize=0)
    with pytest.raises(ValueError, match="timeout"):
        pipe.filter(is_even, timeout=1)  # inline: timeout would be ignored
    with pytest.raises(TypeError, match="backend"):
        pipe.map(add_one, backend=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="iterable"):
        Pipeline(5)  # type: ignore[arg-type]
    with pytest.raises(procession.BackendUnavailableError):
        pipe.map(add_one, backend="no-such-backend").run()
    with pytest.raises(ValueError, match="timeout"):
        pipe.map(add_one, backend="threads", timeout=1).run()  # threads cannot kill


def test_a_pipeline_runs_once() -> None:
    base = Pipeline(range(3))
    doubled = base.map(add_one, backend="threads")
    assert list(doubled.run()) == [1, 2, 3]
    with pytest.raises(PipelineError, match="already run"):
        doubled.run()
    with pytest.raises(PipelineError, match="already run"):
        base.filter(is_even).run()  # same source


def test_a_failed_run_setup_does_not_consume_the_source() -> None:
    pipe = Pipeline(range(3))
    with pytest.raises(ValueError, match="timeout"):
        pipe.map(add_one, backend="threads", timeout=1).run()
    assert list(pipe.map(add_one, backend="threads").run()) == [1, 2, 3]


def test_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    assert list(Pipeline(range(5)).map(add_one, backend="threads").run(progress=True)) == [
        1,
        2,
        3,
        4,
        5,
    ]
    assert "5" in capsys.readouterr().err


# -- collect_primes ------------------------------------------------------------------


def is_prime(n: int) -> bool:
    """Trial division: independent of every sieve in procession."""
    if n < 2:
        return False
    d = 2
    while d * d <= n:
        if n % d == 0:
            return False
        d += 1
    return True


@settings(max_examples=SOME)
@given(
    start=st.integers(-10, 500),
    lengths=st.lists(st.integers(0, 400), min_size=1, max_size=6),
)
def test_collect_primes_matches_trial_division(
    backend_name: str, start: int, lengths: list[int]
) -> None:
    ranges = list(itertools.pairwise(itertools.accumulate(lengths, initial=start)))
    expected = [n for n in range(ranges[0][0], ranges[-1][1]) if is_prime(n)]
    assert collect_primes(ranges, backend=backend_name) == expected


def test_collect_primes_edges() -> None:
    assert collect_primes([], backend="serial") == []
    assert collect_primes([(5, 5)], backend="serial") == []
    assert collect_primes([(0, 2), (2, 3)], backend="serial") == [2]
    assert collect_primes(iter([(90, 100), (100, 110)]), backend="threads") == [
        97,
        101,
        103,
        107,
        109,
    ]
    from procession.workloads import sieve

    assert sieve.collect_primes([(0, 10), (10, 20)], backend="threads") == [
        2, 3, 5, 7, 11, 13, 17, 19,
    ]  # fmt: skip


def test_collect_primes_rejects_bad_ranges() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        collect_primes([(0, 10), (11, 20)], backend="serial")
    with pytest.raises(ValueError, match="first must be <= last"):
        collect_primes([(10, 5)], backend="serial")
    with pytest.raises(TypeError, match="pair"):
        check_ranges([(1, 2, 3)])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="ints"):
        check_ranges([(1.0, 2)])  # type: ignore[list-item]


# -- examples ------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("script", ["article_pipe_sieve.py", "pipeline_sieve.py"])
def test_sieve_examples_run(script: str) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--small"],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "primes" in done.stdout
