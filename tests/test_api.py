"""The core API on every backend: map semantics, bad arguments, Executor, registry."""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import pickle
import threading
import time
from collections.abc import Iterator

import pytest
from _backend_helpers import workers_up_to

import procession
from procession import api
from procession.errors import RemoteTraceback


def double(x: int) -> int:
    return 2 * x


def fail_on_three(x: int) -> int:
    if x == 3:
        raise KeyError(f"bad item {x}")
    return x


def set_env(name: str, value: str) -> None:
    os.environ[name] = value


def get_env(name: str) -> str | None:
    return os.environ.get(name)


def pid_of(_: object) -> int:
    time.sleep(0.01)
    return os.getpid()


# -- map ------------------------------------------------------------------------


@pytest.mark.parametrize("chunksize", ["auto", 1, 7])
def test_map_equals_builtin_map(backend_name: str, chunksize: int | str) -> None:
    data = list(range(200))
    assert list(procession.map(double, data, backend=backend_name, chunksize=chunksize)) == [
        2 * x for x in data
    ]


def test_unordered_is_a_permutation(backend_name: str) -> None:
    data = list(range(100))
    got = list(procession.map(double, data, backend=backend_name, ordered=False, chunksize=3))
    assert sorted(got) == [2 * x for x in data]


def test_empty_input(backend_name: str) -> None:
    assert list(procession.map(double, [], backend=backend_name)) == []
    assert list(procession.map(double, iter(()), backend=backend_name, ordered=False)) == []


def test_lambdas_and_closures_travel(backend_name: str) -> None:
    offset = 10
    got = procession.map(
        lambda x: x + offset, range(5), backend=backend_name, serializer="cloudpickle"
    )
    assert list(got) == [10, 11, 12, 13, 14]


def test_infinite_input_is_read_lazily(backend_name: str) -> None:
    consumed = itertools.count()
    read = 0

    def source() -> Iterator[int]:
        nonlocal read
        for value in consumed:
            read = value + 1
            yield value

    results = procession.map(double, source(), backend=backend_name)
    assert list(itertools.islice(results, 50)) == [2 * x for x in range(50)]
    # A bounded window: only a bounded number of items were read ahead.
    from procession.scheduler import MAX_AUTO_CHUNK

    workers = api.resolve_backend(backend_name, None).workers
    assert read <= 50 + (2 * workers + 2) * MAX_AUTO_CHUNK
    results.close()  # type: ignore[attr-defined]


def test_read_ahead_is_bounded_with_slow_consumer(backend_name: str) -> None:
    read = 0

    def source() -> Iterator[int]:
        nonlocal read
        for value in itertools.count():
            read = value + 1
            yield value

    results = procession.map(double, source(), backend=backend_name, chunksize=2)
    next(results)
    time.sleep(0.3)  # workers idle, window full: reading must stop
    snapshot = read
    time.sleep(0.2)
    assert read == snapshot
    backend = api.resolve_backend(backend_name, None)
    assert read <= 2 * (2 * max(backend.workers, 1) + 2) + 2
    results.close()  # type: ignore[attr-defined]


def test_exception_keeps_type_position_and_remote_traceback(backend_name: str) -> None:
    seen: list[int] = []
    with pytest.raises(KeyError, match="bad item 3") as info:
        for value in procession.map(fail_on_three, range(10), backend=backend_name, chunksize=2):
            seen.append(value)
    assert seen == [0, 1, 2]
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "fail_on_three" in cause.traceback_text
    assert "KeyError" in cause.traceback_text


def test_on_error_return_yields_exceptions_in_place(backend_name: str) -> None:
    got = list(procession.map(fail_on_three, range(6), backend=backend_name, on_error="return"))
    assert got[:3] == [0, 1, 2]
    assert isinstance(got[3], KeyError)
    assert got[4:] == [4, 5]


def test_input_error_propagates_and_pool_stays_usable(backend_name: str) -> None:
    def broken_source() -> Iterator[int]:
        yield 1
        yield 2
        raise OSError("disk gone")

    seen = []
    with pytest.raises(OSError, match="disk gone"):
        for value in procession.map(double, broken_source(), backend=backend_name):
            seen.append(value)
    assert seen == [2, 4]
    assert list(procession.map(double, [5], backend=backend_name)) == [10]


def test_abandoned_iterator_stops_reading(backend_name: str) -> None:
    read = 0

    def source() -> Iterator[int]:
        nonlocal read
        for value in range(100_000):
            read = value + 1
            yield value

    results = procession.map(double, source(), backend=backend_name, chunksize=1)
    for value in results:
        if value >= 10:
            break
    results.close()  # type: ignore[attr-defined]
    stopped_at = read
    time.sleep(0.2)
    assert read == stopped_at < 1000
    assert list(procession.map(double, [1, 2], backend=backend_name)) == [2, 4]


# -- bad arguments ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"workers": 0}, ValueError, "workers must be greater than 0"),
        ({"workers": -2}, ValueError, "workers must be greater than 0"),
        ({"workers": 1.5}, TypeError, "workers must be a positive int"),
        ({"chunksize": 0}, ValueError, "chunksize must be 'auto' or a positive int"),
        ({"chunksize": "big"}, TypeError, "chunksize must be 'auto' or a positive int"),
        ({"on_error": "ignore"}, ValueError, "on_error must be 'raise' or 'return'"),
        ({"retries": -1}, ValueError, "retries must be an int >= 0"),
        ({"timeout": 0}, ValueError, "timeout must be > 0"),
        ({"backend": "nope"}, procession.BackendUnavailableError, "unknown backend 'nope'"),
        ({"serializer": "yaml"}, ValueError, "unknown serializer 'yaml'"),
    ],
)
def test_bad_arguments_fail_at_call_time(
    kwargs: dict[str, object], error: type, pattern: str
) -> None:
    options = {"backend": "serial", **kwargs}
    with pytest.raises(error, match=pattern):
        procession.map(double, [1], **options)  # type: ignore[arg-type]


def test_unknown_backend_lists_the_valid_ones() -> None:
    with pytest.raises(procession.BackendUnavailableError) as info:
        procession.map(double, [1], backend="nope")
    assert "threads" in str(info.value) and "process" in str(info.value)
    assert isinstance(info.value, LookupError)


def test_non_iterable_and_non_callable() -> None:
    with pytest.raises(TypeError, match="iterable"):
        procession.map(double, 42, backend="serial")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        procession.map(42, [1], backend="serial")  # type: ignore[arg-type]


def test_timeout_rejected_where_tasks_cannot_be_killed() -> None:
    with pytest.raises(ValueError, match="cannot stop a running task"):
        procession.map(double, [1], backend="threads", timeout=1)


def test_timeout_needs_item_sized_chunks() -> None:
    with pytest.raises(ValueError, match="timeout= is per item"):
        procession.map(double, [1], backend="process", timeout=1, chunksize=10)


def test_errors_subclass_the_standard_ones() -> None:
    assert issubclass(procession.SerializationError, pickle.PicklingError)
    assert issubclass(procession.WorkerCrashedError, concurrent.futures.BrokenExecutor)
    assert issubclass(procession.TaskTimeoutError, TimeoutError)
    assert issubclass(procession.BackendUnavailableError, ImportError)
    for cls in (
        procession.SerializationError,
        procession.WorkerCrashedError,
        procession.TaskTimeoutError,
        procession.BackendUnavailableError,
        procession.PipelineError,
    ):
        assert issubclass(cls, procession.ProcessionError)


def test_errors_survive_pickling() -> None:
    crash = procession.WorkerCrashedError("boom", exitcode=-9, items=(1, 2))
    again = pickle.loads(pickle.dumps(crash))
    assert (again.exitcode, again.items, again.signal_name) == (-9, (1, 2), "SIGKILL")


# -- Executor ---------------------------------------------------------------------


def test_executor_submit_returns_real_futures(backend_name: str) -> None:
    with procession.Executor(backend=backend_name, workers=workers_up_to(backend_name, 2)) as ex:
        futures = [ex.submit(pow, 2, n) for n in range(8)]
        assert all(isinstance(f, concurrent.futures.Future) for f in futures)
        assert [f.result(timeout=30) for f in concurrent.futures.as_completed(futures)]
        assert [f.result() for f in futures] == [2**n for n in range(8)]
        failing = ex.submit(fail_on_three, 3)
        with pytest.raises(KeyError):
            failing.result(timeout=30)
        assert isinstance(failing.exception().__cause__, RemoteTraceback)  # type: ignore[union-attr]
        assert list(ex.map(pow, [2, 3], [3, 2])) == [8, 9]
        assert ex.submit(divmod, 7, b=2).exception(timeout=30) is not None  # kwargs reach fn
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(pow, 2, 2)


def test_executor_reuses_workers(process_backend_name: str) -> None:
    with procession.Executor(backend=process_backend_name, workers=2) as ex:
        first = set(ex.map(pid_of, range(20), chunksize=1))
        second = set(ex.map(pid_of, range(20), chunksize=1))
        assert first and second
        assert second <= first | ex.backend.worker_pids()
        assert len(first | second) <= 2


def test_processpoolexecutor_compatible_arguments() -> None:
    import multiprocessing

    from procession import Executor as ProcessPoolExecutor

    with ProcessPoolExecutor(
        2,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=set_env,
        initargs=("PROCESSION_TEST_INIT", "yes"),
        max_tasks_per_child=5,
    ) as ex:
        assert ex.backend.workers == 2
        values = list(ex.map(get_env, ["PROCESSION_TEST_INIT"] * 4))
        assert values == ["yes"] * 4


def test_shutdown_waits_for_submitted_work(backend_name: str) -> None:
    ex = procession.Executor(backend=backend_name, workers=workers_up_to(backend_name, 2))
    futures = [ex.submit(time.sleep, 0.05) for _ in range(4)]
    ex.shutdown(wait=True)
    assert all(f.done() and f.exception() is None for f in futures)


def test_shutdown_cancel_futures(process_backend_name: str) -> None:
    ex = procession.Executor(backend=process_backend_name, workers=1)
    futures = [ex.submit(time.sleep, 0.3) for _ in range(5)]
    deadline = time.monotonic() + 30
    while not futures[0].running() and time.monotonic() < deadline:
        time.sleep(0.01)  # the pool may still be starting
    ex.shutdown(wait=True, cancel_futures=True)
    # The running task is not cancelled (concurrent.futures semantics); queued ones are.
    assert not futures[0].cancelled()
    assert futures[0].result() is None
    assert all(f.cancelled() for f in futures[1:])


# -- registry ---------------------------------------------------------------------


class InlineBackend(procession.Backend):
    name = "test-inline"
    capabilities = procession.Capabilities(isolated=False, kill=False, crash_detection=False)

    def start(self) -> None:
        pass

    def submit(self, task: bytes) -> procession.TaskFuture:
        from procession import worker

        future = procession.TaskFuture()
        future.set_running_or_notify_cancel()
        future.mark_started()
        future.set_result(worker.run_task(task))
        return future

    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        pass


def test_register_custom_backend_by_name() -> None:
    procession.register_backend("test-inline", InlineBackend)
    procession.register_backend("test-inline", InlineBackend)  # same thing twice: harmless
    assert list(procession.map(double, range(4), backend="test-inline")) == [0, 2, 4, 6]
    info = procession.available_backends()["test-inline"]
    assert info.usable and info.origin == "registered at runtime"
    with pytest.raises(ValueError, match="already taken"):
        procession.register_backend("test-inline", procession.create_backend("serial").__class__)
    with pytest.raises(ValueError, match="already taken"):
        procession.register_backend("threads", InlineBackend)


def test_register_rejects_what_is_not_a_backend() -> None:
    with pytest.raises(procession.BackendUnavailableError, match=r"not a procession\.Backend"):
        procession.register_backend("bogus", dict)

    class Half(procession.Backend):
        def start(self) -> None:
            pass

    with pytest.raises(procession.BackendUnavailableError, match="does not implement"):
        procession.register_backend("half", Half)


def test_entry_point_backend_from_an_installed_distribution() -> None:
    infos = procession.available_backends()
    assert infos["example-inline"].usable
    assert infos["example-inline"].origin == "distribution procession-example-backend"
    assert list(procession.map(double, range(3), backend="example-inline")) == [0, 2, 4]


def test_broken_plugins_are_reported_not_fatal() -> None:
    infos = procession.available_backends()
    assert not infos["broken-import"].usable
    assert "procession-broken-plugin" in (infos["broken-import"].error or "")
    assert not infos["not-a-backend"].usable
    assert "not a procession.Backend" in (infos["not-a-backend"].error or "")
    with pytest.raises(procession.BackendUnavailableError, match="procession-broken-plugin"):
        procession.map(double, [1], backend="not-a-backend")


def test_create_backend_instance_is_used_as_given() -> None:
    backend = procession.create_backend("threads", workers=3)
    try:
        assert list(procession.map(double, range(5), backend=backend)) == [0, 2, 4, 6, 8]
        with pytest.raises(ValueError, match="conflicts"):
            procession.map(double, [1], backend=backend, workers=2)
    finally:
        backend.shutdown()


def test_default_backend_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCESSION_BACKEND", "threads")
    assert api.default_backend_name() == "threads"
    assert list(procession.map(lambda _: threading.current_thread().name, [1])) != ["MainThread"]
    monkeypatch.delenv("PROCESSION_BACKEND")
    assert api.default_backend_name() == "process"


def test_import_is_lazy() -> None:
    import subprocess
    import sys

    code = (
        "import sys, procession; "
        "print(sorted(m for m in ('cloudpickle', 'loky', 'dask', 'distributed', 'tqdm') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
