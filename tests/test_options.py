"""Options are validated once: the same bad value raises the same exception everywhere,
and what a backend cannot honour is refused, never ignored.  Slow sources stream."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import procession
from procession import pools
from procession.options import MapOptions

# Each entry point applies the options to a tiny map on the threads backend.
ENTRY_POINTS: dict[str, Callable[..., Any]] = {
    "map": lambda **kw: list(procession.map(abs, [1], backend="threads", **kw)),
    "Executor.map": lambda **kw: list(procession.Executor(backend="threads").map(abs, [1], **kw)),
    "Pipeline": lambda **kw: list(procession.Pipeline([1]).map(abs, backend="threads", **kw).run()),
}

BAD_OPTIONS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"chunksize": 0}, ValueError, "chunksize must be 'auto' or a positive int"),
    ({"chunksize": "big"}, TypeError, "chunksize must be 'auto' or a positive int"),
    ({"chunksize": 2.5}, TypeError, "chunksize must be 'auto' or a positive int"),
    ({"timeout": "soon"}, TypeError, "timeout must be a number of seconds"),
    ({"timeout": -1}, ValueError, "timeout must be > 0 seconds"),
]
MAP_ONLY_BAD_OPTIONS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"ordered": "yes"}, TypeError, "ordered must be True or False"),
    ({"progress": "x"}, TypeError, "progress must be True or False"),
    ({"retries": -1}, ValueError, "retries must be an int >= 0"),
    ({"retries": 1.5}, TypeError, "retries must be an int >= 0"),
    ({"on_error": "ignore"}, ValueError, "on_error must be 'raise' or 'return'"),
]


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize(("options", "error", "message"), BAD_OPTIONS)
def test_same_bad_option_same_exception_from_every_entry_point(
    entry: str, options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        ENTRY_POINTS[entry](**options)


@pytest.mark.parametrize("entry", ["map", "Executor.map"])
@pytest.mark.parametrize(("options", "error", "message"), MAP_ONLY_BAD_OPTIONS)
def test_map_options_refused_alike(
    entry: str, options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        ENTRY_POINTS[entry](**options)
    with pytest.raises(error, match=message):
        MapOptions(**options)


def test_bad_options_are_refused_before_any_backend_starts() -> None:
    before = len(pools.shared_backends())
    with pytest.raises(ValueError, match="chunksize"):
        procession.map(abs, [1], backend="process", workers=3, chunksize=0)
    assert len(pools.shared_backends()) == before


def test_serial_refuses_more_than_one_worker() -> None:
    with pytest.raises(ValueError, match="serial backend runs one task at a time"):
        procession.map(abs, [1], backend="serial", workers=8)


@pytest.mark.parametrize("backend", ["threads", "serial"])
def test_retries_refused_where_crashes_cannot_be_detected(backend: str) -> None:
    with pytest.raises(ValueError, match="cannot detect a crashed worker"):
        procession.map(abs, [1], backend=backend, retries=2)
    with (
        procession.Executor(backend=backend) as ex,
        pytest.raises(ValueError, match="cannot detect a crashed worker"),
    ):
        ex.map(abs, [1], retries=2)


def test_timeout_refused_where_tasks_cannot_be_stopped() -> None:
    with pytest.raises(ValueError, match="cannot stop a running task"):
        list(procession.Pipeline([1]).map(abs, backend="threads", timeout=1).run())


@pytest.mark.parametrize("value", [0, -2])
def test_executor_max_workers_message_matches_the_stdlib(value: int) -> None:
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        procession.Executor(max_workers=value)
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        procession.Executor(value)


def test_workers_type_mistake_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="workers must be a positive int"):
        procession.map(abs, [1], backend="threads", workers="4")  # type: ignore[arg-type]


# -- slow sources stream ----------------------------------------------------------


def trickle(count: int, period: float) -> Iterator[int]:
    for i in range(count):
        time.sleep(period)
        yield i


def quick(x: int) -> int:
    return x + 1


@pytest.mark.timeout(90)
def test_slow_source_first_result_arrives_within_about_one_period(backend_name: str) -> None:
    period = 0.05
    # Teach the chunker that the function is very fast, as an earlier map would:
    # the next map of it then starts with large chunks.
    list(procession.map(quick, range(20_000), backend=backend_name))
    started = time.monotonic()
    run = procession.map(quick, trickle(40, period), backend=backend_name)
    first = next(run)
    waited = time.monotonic() - started
    assert first == 1
    # One item period, one task, and ~100 ms of scheduling; the loaded test
    # machine gets generous slack, but a chunk sized for the fast function
    # (thousands of items) would take minutes.
    assert waited < period + 2.0, f"first result after {waited:.2f}s"
    assert list(run) == list(range(2, 41))


@pytest.mark.timeout(60)
def test_a_paused_pipeline_source_does_not_hold_back_results() -> None:
    import queue
    import threading

    feed: queue.Queue[int | None] = queue.Queue()

    def source() -> Iterator[int]:
        while (item := feed.get()) is not None:
            yield item

    results = iter(procession.Pipeline(source()).map(quick, workers=2, backend="threads").run())
    got: list[int] = []
    reader = threading.Thread(target=lambda: got.append(next(results)))
    feed.put(1)
    reader.start()
    reader.join(10)  # no more input comes while we wait
    assert got == [2]
    feed.put(None)
    assert list(results) == []


def test_forked_child_gets_a_fresh_pool() -> None:
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    parent_pool = pools.shared_backend("threads", 2)
    list(procession.map(abs, [-1], backend="threads", workers=2))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: must not see the parent's pool objects
        try:
            fresh = pools.shared_backend("threads", 2) is not parent_pool
            os.write(write, b"1" if fresh and len(pools.shared_backends()) == 1 else b"0")
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == b"1"
