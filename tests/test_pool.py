"""procession.Pool against the promises of the multiprocessing.Pool documentation.

Each test quotes (in its name or docstring) what the standard library's
documentation promises; the core ones run on every backend.  Then what
procession adds: a dead worker fails its tasks instead of hanging, closures
work on the default backend.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
import time
from typing import Any

import pytest

import procession
from procession.errors import RemoteTraceback

# -- functions the workers run (module level: picklable by reference) -----------

_counter = threading.local()


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def fail_on_three(x: int) -> int:
    if x == 3:
        raise KeyError(f"bad item {x}")
    return x


def sleep_then(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


def where_and_when(_: object) -> tuple[tuple[int, int], int]:
    """(worker identity, how many items this worker thread ran before)."""
    count = getattr(_counter, "n", 0)
    _counter.n = count + 1
    return (os.getpid(), threading.get_ident()), count


_initialized: list[str] = []


def remember(value: str) -> None:
    _initialized.append(value)


def initialized(_: object) -> list[str]:
    return list(_initialized)


def exit_on_one(x: int) -> int:
    if x == 1:
        os._exit(7)
    return x


def returns_exception(_: object) -> BaseException:
    return ValueError("a value, not a failure")


# -- the core promises, on every backend ------------------------------------------


def workers_for(backend_name: str) -> int | None:
    """Two workers, except where the backend runs one task at a time (serial)."""
    return None if backend_name == "serial" else 2


def test_map_is_builtin_map(backend_name: str) -> None:
    with procession.Pool(workers_for(backend_name), backend=backend_name) as pool:
        assert pool.map(square, range(20)) == [x * x for x in range(20)]
        assert pool.map(square, iter(range(5))) == [0, 1, 4, 9, 16]
        assert pool.map(square, []) == []


def test_chunksize_is_honoured(backend_name: str) -> None:
    """map: "chops the iterable into a number of chunks which it submits to the
    process pool as separate tasks"; each chunk runs whole on one worker, in order."""
    with procession.Pool(workers_for(backend_name), backend=backend_name) as pool:
        got = pool.map(where_and_when, range(12), chunksize=4)
    for start in (0, 4, 8):
        chunk = got[start : start + 4]
        assert len({who for who, _ in chunk}) == 1, chunk
        counts = [n for _, n in chunk]
        assert counts == list(range(counts[0], counts[0] + 4)), chunk


def test_apply_and_apply_async_with_callback(backend_name: str) -> None:
    seen: list[tuple[int, str]] = []
    done = threading.Event()

    def callback(value: int) -> None:
        seen.append((value, threading.current_thread().name))
        done.set()

    with procession.Pool(workers_for(backend_name), backend=backend_name) as pool:
        assert pool.apply(add, (2, 3)) == 5
        assert pool.apply(add, (), {"a": 1, "b": 2}) == 3
        result = pool.apply_async(add, (20, 22), callback=callback)
        assert result.get(timeout=60) == 42
        assert result.ready() and result.successful()
    assert done.wait(10)
    # "Callbacks should complete immediately since otherwise the thread which
    # handles the results will get blocked": they run in a result thread, not here.
    assert seen == [(42, seen[0][1])]
    assert seen[0][1] != threading.current_thread().name


def test_worker_exception_is_reraised_with_remote_traceback(backend_name: str) -> None:
    errors: list[BaseException] = []
    with procession.Pool(workers_for(backend_name), backend=backend_name) as pool:
        with pytest.raises(KeyError, match="bad item 3") as info:
            pool.map(fail_on_three, range(6), chunksize=1)
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "fail_on_three" in str(info.value.__cause__)

        result = pool.apply_async(fail_on_three, (3,), error_callback=errors.append)
        result.wait(60)
        assert result.ready() and not result.successful()
        with pytest.raises(KeyError):
            result.get()
        # The pool keeps working after a task raised.
        assert pool.apply(square, (4,)) == 16
    assert len(errors) == 1 and isinstance(errors[0], KeyError)


def test_imap_and_imap_unordered(backend_name: str) -> None:
    with procession.Pool(workers_for(backend_name), backend=backend_name) as pool:
        assert list(pool.imap(square, range(10))) == [x * x for x in range(10)]
        assert list(pool.imap(square, iter(range(10)), chunksize=3)) == [x * x for x in range(10)]
        unordered = list(pool.imap_unordered(square, range(10), chunksize=2))
        assert sorted(unordered) == [x * x for x in range(10)]


def test_starmap(backend_name: str) -> None:
    with procession.Pool(workers_for(backend_name), backend=backend_name) as pool:
        assert pool.starmap(add, [(1, 2), (3, 4)]) == [3, 7]
        assert pool.starmap_async(add, iter([(5, 6)])).get(timeout=60) == [11]


def test_initializer_runs_in_every_worker(backend_name: str) -> None:
    options = {"initializer": remember, "initargs": ("ready",), "backend": backend_name}
    with procession.Pool(workers_for(backend_name), **options) as pool:
        for seen in pool.map(initialized, range(8), chunksize=1):
            assert "ready" in seen


# -- AsyncResult, timeouts, callbacks (one backend: these are the pool's own logic) --


def test_async_result_timeouts_and_states() -> None:
    with procession.Pool(1, backend="threads") as pool:
        result = pool.apply_async(sleep_then, (1.0, "late"))
        with pytest.raises(ValueError, match="not ready"):
            result.successful()
        # "If the result does not arrive within timeout seconds then
        # multiprocessing.TimeoutError is raised."
        with pytest.raises(multiprocessing.TimeoutError):
            result.get(timeout=0.05)
        result.wait(0.01)
        assert not result.ready()
        assert result.get(timeout=30) == "late"
        assert result.successful()


def test_map_async_callback_gets_the_whole_list() -> None:
    got: list[list[int]] = []
    with procession.Pool(2, backend="threads") as pool:
        result = pool.map_async(square, range(7), chunksize=2, callback=got.append)
        assert result.get(timeout=30) == [x * x for x in range(7)]
        empty = pool.map_async(square, [], callback=got.append)
        assert empty.get(timeout=30) == []
        pool.close()
        pool.join()
    assert got == [[x * x for x in range(7)], []]


def test_map_async_error_callback_gets_the_exception() -> None:
    errors: list[BaseException] = []
    with procession.Pool(2, backend="threads") as pool:
        result = pool.map_async(fail_on_three, range(8), chunksize=2, error_callback=errors.append)
        with pytest.raises(KeyError):
            result.get(timeout=30)
        pool.close()
        pool.join()
    assert len(errors) == 1 and isinstance(errors[0], KeyError)


def test_imap_next_timeout_and_failures_in_place() -> None:
    with procession.Pool(2, backend="threads") as pool:
        slow = pool.imap(sleep_then, [1.0])
        # IMapIterator.next(timeout): multiprocessing.TimeoutError when nothing arrives.
        with pytest.raises(multiprocessing.TimeoutError):
            slow.next(timeout=0.05)
        assert slow.next(timeout=30) is None
        with pytest.raises(StopIteration):
            slow.next()
        # A failed item raises at its place; the items after it still come.
        it = pool.imap(fail_on_three, range(5))
        assert [next(it) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(KeyError):
            next(it)
        assert list(it) == [4]
        # An exception *returned* by the function is a value, not a failure.
        assert isinstance(next(pool.imap(returns_exception, [0])), ValueError)


def test_callback_that_raises_does_not_hang_the_pool(caplog: pytest.LogCaptureFixture) -> None:
    def bad_callback(_: object) -> None:
        raise RuntimeError("callback bug")

    with procession.Pool(1, backend="threads") as pool:
        result = pool.apply_async(square, (3,), callback=bad_callback)
        assert result.get(timeout=30) == 9
        assert pool.apply(square, (4,)) == 16
    assert "callback" in caplog.text


# -- lifecycle ----------------------------------------------------------------------


def test_close_join_lifecycle() -> None:
    pool = procession.Pool(2, backend="threads")
    with pytest.raises(ValueError, match="still running"):
        pool.join()
    pending = pool.apply_async(sleep_then, (0.2, "done"))
    pool.close()
    # "Prevents any more tasks from being submitted to the pool."
    with pytest.raises(ValueError, match="Pool not running"):
        pool.apply_async(square, (1,))
    with pytest.raises(ValueError, match="Pool not running"):
        pool.map(square, [1])
    with pytest.raises(ValueError, match="Pool not running"):
        pool.imap(square, [1])
    # "Once all the tasks have been completed the worker processes will exit."
    pool.join()
    assert pending.ready() and pending.get() == "done"
    # "__enter__() returns the pool object" only for a running pool.
    with pytest.raises(ValueError), pool:
        pass


def test_exit_terminates_and_fails_unfinished_work() -> None:
    started = time.monotonic()
    with procession.Pool(1, backend="process") as pool:
        hung = pool.apply_async(sleep_then, (60,))
        queued = pool.apply_async(square, (2,))
        lazy = pool.imap(sleep_then, [60, 60])
        time.sleep(0.3)
    # "__exit__() calls terminate()": the hung task is stopped, not waited for.
    assert time.monotonic() - started < 30
    for result in (hung, queued):
        result.wait(10)
        assert result.ready()
        with pytest.raises(procession.WorkerCrashedError):
            result.get()
    with pytest.raises(procession.WorkerCrashedError):
        lazy.next(timeout=10)
    with pytest.raises(ValueError, match="Pool not running"):
        pool.apply(square, (1,))
    pool.join()  # after terminate, join returns


def test_pools_do_not_pickle() -> None:
    with procession.Pool(1, backend="threads") as pool, pytest.raises(NotImplementedError):
        pickle.dumps(pool)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"processes": 0}, ValueError, "at least 1"),
        ({"processes": "2"}, TypeError, "processes"),
        ({"initializer": 3}, TypeError, "initializer must be a callable"),
        ({"maxtasksperchild": 0}, ValueError, "maxtasksperchild"),
        ({"backend": "no-such-backend"}, LookupError, "no-such-backend"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        procession.Pool(**kwargs)


def test_bad_chunksize() -> None:
    with procession.Pool(1, backend="threads") as pool:
        with pytest.raises(ValueError, match="Chunksize must be 1"):
            pool.map(square, [1, 2], chunksize=0)
        with pytest.raises(ValueError, match="Chunksize must be 1"):
            pool.imap(square, [1, 2], chunksize=0)


# -- what procession adds -----------------------------------------------------------


def test_dead_worker_fails_its_tasks_instead_of_hanging(crash_backend_name: str) -> None:
    with procession.Pool(workers_for(crash_backend_name), backend=crash_backend_name) as pool:
        with pytest.raises(procession.WorkerCrashedError):
            pool.map(exit_on_one, range(4), chunksize=1)
        result = pool.apply_async(exit_on_one, (1,))
        with pytest.raises(procession.WorkerCrashedError):
            result.get(timeout=60)
        crashed = pool.imap(exit_on_one, range(3))
        assert next(crashed) == 0
        with pytest.raises(procession.WorkerCrashedError):
            next(crashed)
        # The pool heals: a fresh worker takes the next task.
        assert pool.map(square, range(4)) == [0, 1, 4, 9]


def test_lambdas_and_closures_on_the_default_backend() -> None:
    offset = 10
    with procession.Pool(2) as pool:
        assert pool.map(lambda x: x + offset, range(3)) == [10, 11, 12]
        assert pool.apply(lambda: offset * 2) == 20


def test_maxtasksperchild_replaces_workers() -> None:
    with procession.Pool(1, maxtasksperchild=1, backend="process") as pool:
        pids = pool.map(sleep_then_pid, range(3), chunksize=1)
    assert len(set(pids)) == 3


def sleep_then_pid(_: object) -> int:
    return os.getpid()


def test_context_picks_the_start_method() -> None:
    context = multiprocessing.get_context("spawn")
    with procession.Pool(1, context=context, backend="process") as pool:
        assert pool.map(square, [3]) == [9]
