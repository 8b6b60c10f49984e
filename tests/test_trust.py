"""Regression tests for "Trust at the edges", the scheduler and worker-runtime items.

Each test names the numbered item of the issue it guards.
"""

from __future__ import annotations

import functools
import gc
import os
import pickle
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest
from _backend_helpers import workers_up_to

import procession
from procession.errors import RemoteTraceback, SerializationError


def crash_first_time(marks: str, crashing: tuple[int, ...], x: int) -> int:
    """Kill the worker the first time it sees an item of ``crashing``."""
    mark = Path(marks) / str(x)
    if x in crashing and not mark.exists():
        mark.write_text("seen")
        os._exit(3)
    return x * 10


# -- 1. ordered map with retries never deadlocks -------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ordered", [True, False])
def test_items_waiting_for_a_retry_always_enter_the_window(
    crash_backend_name: str, tmp_path: Path, ordered: bool
) -> None:
    fn = functools.partial(crash_first_time, str(tmp_path), (0, 5))
    got = list(
        procession.map(
            fn,
            range(20),
            backend=crash_backend_name,
            workers=2,
            chunksize=2,
            retries=1,
            ordered=ordered,
        )
    )
    expected = [x * 10 for x in range(20)]
    assert (got if ordered else sorted(got)) == expected


# -- 2. results that cannot be rebuilt in the parent ---------------------------------


def _refuse_to_load() -> None:
    raise ValueError("this object refuses to be unpickled")


def _exit_on_load() -> None:
    sys.exit(4)


class LoadsBadly:
    """Pickles fine in the worker; its unpickling in the parent raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse_to_load, ())


class ExitsOnLoad:
    """Its unpickling in the parent calls sys.exit()."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_exit_on_load, ())


class ExitsOnDump:
    """Its pickling in the worker raises SystemExit."""

    def __reduce__(self) -> tuple[Any, ...]:
        raise SystemExit(5)


def make(kind: str) -> object:
    return {"loads": LoadsBadly, "exit-load": ExitsOnLoad, "exit-dump": ExitsOnDump}[kind]()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["loads", "exit-load"])
def test_result_that_cannot_be_rebuilt_fails_its_future(backend_name: str, kind: str) -> None:
    with procession.Executor(backend=backend_name, workers=workers_up_to(backend_name, 2)) as ex:
        future = ex.submit(make, kind)
        with pytest.raises(SerializationError) as info:
            future.result(timeout=30)
        assert "could not be rebuilt in the parent" in str(info.value)
        assert info.value.serializer == ex._serializer.name
        assert info.value.__cause__ is not None
        # The pool is still usable.
        assert ex.submit(abs, -3).result(timeout=30) == 3


@pytest.mark.timeout(60)
def test_result_that_cannot_be_rebuilt_fails_its_items_in_map(backend_name: str) -> None:
    got = list(
        procession.map(
            make, ["loads", "exit-load"], backend=backend_name, chunksize=1, on_error="return"
        )
    )
    assert all(isinstance(item, SerializationError) for item in got)
    assert [item.index for item in got] == [0, 1]
    assert list(procession.map(abs, [-1, -2], backend=backend_name)) == [1, 2]


@pytest.mark.timeout(60)
def test_result_whose_pickling_raises_system_exit_fails_with_system_exit(
    backend_name: str,
) -> None:
    with procession.Executor(backend=backend_name, workers=workers_up_to(backend_name, 2)) as ex:
        future = ex.submit(make, "exit-dump")
        with pytest.raises(SystemExit):
            future.result(timeout=30)
        assert ex.submit(abs, -3).result(timeout=30) == 3


# -- 5. no stale function state across maps ------------------------------------------


def make_counter() -> Any:
    seen: list[int] = []

    def count(x: int) -> int:
        seen.append(x)
        return len(seen)

    return count


def test_each_map_runs_the_function_as_it_is_in_the_parent(backend_name: str) -> None:
    count = make_counter()
    # One worker and one chunk: within a map the closure's state is shared as
    # with the builtin map; across maps it starts again from the parent's copy.
    options: dict[str, Any] = {"workers": 1, "chunksize": 4, "serializer": "cloudpickle"}
    first = list(procession.map(count, range(4), backend=backend_name, **options))
    second = list(procession.map(count, range(4), backend=backend_name, **options))
    assert first == [1, 2, 3, 4]
    assert second == [1, 2, 3, 4]


def test_executor_map_and_submit_see_the_parent_state_of_each_call(backend_name: str) -> None:
    count = make_counter()
    with procession.Executor(backend=backend_name, workers=1, serializer="cloudpickle") as ex:
        assert list(ex.map(count, range(3), chunksize=3)) == [1, 2, 3]
        assert list(ex.map(count, range(3), chunksize=3)) == [1, 2, 3]
        assert [ex.submit(count, 0).result(timeout=30) for _ in range(3)] == [1, 1, 1]


# -- 6. serialization errors belong to the future ------------------------------------


def test_unpicklable_arguments_fail_the_future_not_submit(backend_name: str) -> None:
    import threading

    with procession.Executor(backend=backend_name, workers=1) as ex:
        future = ex.submit(id, threading.Lock())
        with pytest.raises(SerializationError) as info:
            future.result(timeout=10)
        assert isinstance(info.value, pickle.PicklingError)
        assert "lock" in str(info.value).lower()
        assert ex.submit(abs, -1).result(timeout=30) == 1


def test_submit_of_a_non_callable_says_what_to_submit(backend_name: str) -> None:
    with (
        procession.Executor(backend=backend_name, workers=1) as ex,
        pytest.raises(TypeError, match="the function to submit must be callable"),
    ):
        ex.submit(42)  # type: ignore[arg-type]


# -- 8. no references kept -----------------------------------------------------------


class Big:
    """A result object whose lifetime the test follows with a weak reference."""

    def __init__(self, x: int) -> None:
        self.x = x


def make_big(x: int) -> Big:
    return Big(x)


def test_map_iterator_drops_each_result_as_it_yields_it(backend_name: str) -> None:
    run = procession.map(make_big, range(6), backend=backend_name, chunksize=6)
    first = next(run)
    ref = weakref.ref(first)
    del first
    gc.collect()
    assert ref() is None, "the map iterator still holds a result it already yielded"
    assert [b.x for b in run] == [1, 2, 3, 4, 5]


def test_finished_future_holds_no_arguments(backend_name: str) -> None:
    argument = Big(7)
    ref = weakref.ref(argument)
    with procession.Executor(backend=backend_name, workers=1) as ex:
        future = ex.submit(getattr, argument, "x")
        del argument
        assert future.result(timeout=30) == 7
        gc.collect()
        assert ref() is None, "a finished future keeps its arguments alive"


# -- 10. KeyboardInterrupt raised by task code is the task's exception ---------------


def interrupt(x: int) -> int:
    if x == 2:
        raise KeyboardInterrupt("raised by the task itself")
    return x


def test_keyboard_interrupt_from_task_code_is_the_tasks_exception(backend_name: str) -> None:
    got = list(
        procession.map(interrupt, range(4), backend=backend_name, chunksize=1, on_error="return")
    )
    assert got[:2] == [0, 1] and got[3] == 3
    assert isinstance(got[2], KeyboardInterrupt)
    assert isinstance(got[2].__cause__, RemoteTraceback)
    assert "raised by the task itself" in str(got[2].__cause__)
    # The pool survives it.
    assert list(procession.map(abs, [-5], backend=backend_name)) == [5]


# -- Executor: terminate vs kill, and backends it does not own -----------------------


def nap(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


@pytest.mark.timeout(60)
def test_executor_never_stops_a_backend_instance_it_does_not_own(
    crash_backend_name: str,
) -> None:
    backend = procession.create_backend(crash_backend_name, workers=2)
    try:
        ex = procession.Executor(backend=backend)
        running = ex.submit(nap, 30)
        assert ex.submit(abs, -1).result(timeout=30) == 1
        ex.terminate_workers()
        with pytest.raises(procession.WorkerCrashedError, match="only this executor's tasks"):
            running.result(timeout=30)
        # The instance is still the caller's, and still works.
        assert list(procession.map(abs, [-2, -3], backend=backend)) == [2, 3]
    finally:
        backend.shutdown(wait=False, kill=True)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("method", "exitcode"), [("kill_workers", -9), ("terminate_workers", -15)])
def test_kill_workers_sends_sigkill_terminate_sigterm(method: str, exitcode: int) -> None:
    ex = procession.Executor(backend="process", workers=1)
    ex.submit(abs, -1).result(timeout=30)
    (worker,) = ex.backend._workers  # type: ignore[attr-defined]
    getattr(ex, method)()
    worker.process.join(5)
    assert worker.process.exitcode == exitcode


# -- a failing initializer is reported one way on every backend ----------------------


def broken_initializer() -> None:
    raise ValueError("the initializer broke")


@pytest.mark.timeout(90)
def test_failing_initializer_is_reported_one_way_on_every_backend(backend_name: str) -> None:
    ex = procession.Executor(
        backend=backend_name,
        workers=workers_up_to(backend_name, 2),
        initializer=broken_initializer,
    )
    try:
        for value in (-1, -2):
            with pytest.raises(procession.WorkerCrashedError) as info:
                ex.submit(abs, value).result(timeout=60)
            assert str(info.value).startswith(
                "the worker initializer raised builtins.ValueError: the initializer broke; "
                "the pool runs no more tasks"
            )
            assert isinstance(info.value.__cause__, RemoteTraceback)
            assert "broken_initializer" in str(info.value.__cause__)
    finally:
        ex.kill_workers()
