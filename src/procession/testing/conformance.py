"""The backend conformance suite: what every procession backend must do.

A backend author runs it by subclassing :class:`BackendConformance` in a test
module and naming the backend::

    # test_my_backend.py
    from procession.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        backend = "mine"          # a registered name (entry point or register_backend)

or, for a backend that needs options, by overriding the ``conformance_backend``
fixture to return a started instance (the suite never shuts it down)::

    class TestMyBackend(BackendConformance):
        @pytest.fixture(scope="class")
        def conformance_backend(self):
            with procession.create_backend("mine", address="...") as backend:
                yield backend

The tests cover results (hypothesis, over chunk sizes and both orderings),
empty and infinite input, bounded read-ahead, user exceptions and their
remote tracebacks, ``on_error="return"``, Executor submit/map/shutdown,
Recipes built once per worker, adapters, and, only where the backend's
:class:`~procession.Capabilities` promise them, worker crashes, retries and
``timeout=``; a backend that cannot kill a task must reject ``timeout=`` up
front.  ``CoreConformance`` and ``CrashConformance`` are the two halves, for
suites that choose per capability which to run.
"""

from __future__ import annotations

import functools
import itertools
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import procession
from procession.backends.base import Backend, Capabilities
from procession.backends.registry import get_backend_class
from procession.errors import RemoteTraceback, TaskTimeoutError, WorkerCrashedError
from procession.serialization.adapters import find_reducer
from procession.serialization.serializers import get_serializer
from procession.testing import _tasks
from procession.worker import encode_setup

__all__ = ["BackendConformance", "CoreConformance", "CrashConformance", "resolve_instance"]

BackendSpec = str | Backend

# Per-test bounds: generous for a loaded 2-core CI machine, tight enough to
# turn a hang into a failure instead of a stuck run.
TEST_TIMEOUT = 60


def resolve_instance(backend: BackendSpec) -> Backend:
    """The Backend object that ``backend=`` resolves to (a name: the warm shared one).

    Example (in a test of your own, to read what the backend under test promises)::

        def test_kills(self, conformance_backend):
            assert resolve_instance(conformance_backend).capabilities.kill
    """
    if isinstance(backend, Backend):
        return backend
    from procession.api import resolve_backend

    return resolve_backend(backend, None)


def _sibling(backend: Backend, worker_setup: bytes | None, workers: int = 2) -> Backend:
    """A new instance of ``backend``'s class: the contract's constructor keywords only."""
    sibling = type(backend)(workers=workers, worker_setup=worker_setup)
    sibling.start()
    return sibling


def _require_crash_detection(capabilities: Capabilities) -> None:
    if not (capabilities.isolated and capabilities.crash_detection):
        pytest.skip("the backend does not declare isolated workers with crash_detection")


def _hypothesis_settings() -> settings:
    # Built at call time so the project's loaded profile (max_examples, ...) applies.
    return settings(
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


class _Base:
    #: The registered name of the backend under test (or override ``conformance_backend``).
    backend: ClassVar[str | None] = None

    @pytest.fixture
    def conformance_backend(self, request: pytest.FixtureRequest) -> BackendSpec:
        """The backend under test: a registered name or a started Backend instance."""
        override = request.config.getoption("procession_backend", default=None)
        if override:
            return str(override)
        if self.backend is None:
            raise pytest.UsageError(
                f"{type(self).__name__} subclasses procession.testing.BackendConformance but "
                f"names no backend: set `backend = 'name'` on the class or override the "
                f"`conformance_backend` fixture"
            )
        return self.backend

    @pytest.fixture
    def capabilities(self, conformance_backend: BackendSpec) -> Capabilities:
        return resolve_instance(conformance_backend).capabilities


@pytest.mark.timeout(TEST_TIMEOUT)
class CoreConformance(_Base):
    """Behaviour every backend must have, whatever its capabilities.

    Example (a backend that cannot detect crashes runs only this half)::

        class TestThreadsLike(CoreConformance):
            backend = "inline"
    """

    def test_results_equal_builtin_map(self, conformance_backend: BackendSpec) -> None:
        @_hypothesis_settings()
        @given(
            items=st.lists(st.integers(-(2**40), 2**40), max_size=40),
            chunksize=st.sampled_from(["auto", 1, 2, 3, 7, 64]),
            ordered=st.booleans(),
        )
        def check(items: list[int], chunksize: int | str, ordered: bool) -> None:
            got = list(
                procession.map(
                    _tasks.square,
                    items,
                    backend=conformance_backend,
                    chunksize=chunksize,
                    ordered=ordered,
                )
            )
            expected = list(map(_tasks.square, items))
            if ordered:
                assert got == expected
            else:
                assert sorted(got) == sorted(expected)

        check()

    def test_unordered_yields_a_permutation(self, conformance_backend: BackendSpec) -> None:
        # One slow item, so that completion order can differ from input order.
        # Which order a backend completes tasks in is its own dispatch policy
        # (a worker may hold tasks queued behind a slow one): only the
        # permutation is the contract.
        items = list(range(40))
        got = list(
            procession.map(
                functools.partial(_tasks.sleep_on, bad=3, seconds=0.2),
                items,
                backend=conformance_backend,
                chunksize=1,
                ordered=False,
            )
        )
        assert sorted(got) == items

    def test_closure_with_cloudpickle(self, conformance_backend: BackendSpec) -> None:
        offset = 1000
        got = list(
            procession.map(
                lambda x: x + offset,
                range(25),
                backend=conformance_backend,
                serializer="cloudpickle",
            )
        )
        assert got == [x + offset for x in range(25)]

    def test_empty_input(self, conformance_backend: BackendSpec) -> None:
        assert list(procession.map(_tasks.square, [], backend=conformance_backend)) == []
        assert list(procession.map(_tasks.square, iter(()), backend=conformance_backend)) == []

    @pytest.mark.parametrize("chunksize", [1, 3])
    def test_infinite_input_is_read_lazily(
        self, conformance_backend: BackendSpec, chunksize: int
    ) -> None:
        pulled = 0

        def naturals() -> Iterator[int]:
            nonlocal pulled
            for n in itertools.count():
                pulled += 1
                yield n

        workers = max(resolve_instance(conformance_backend).workers, 1)
        results = procession.map(
            _tasks.square, naturals(), backend=conformance_backend, chunksize=chunksize
        )
        try:
            first = list(itertools.islice(results, 10))
        finally:
            results.close()  # type: ignore[attr-defined]
        assert first == [n * n for n in range(10)]
        # The scheduler keeps about two chunks per worker in flight; allow
        # slack, but reading must stop far short of "everything".
        assert pulled <= 10 + (4 * workers + 2) * chunksize, (
            f"read {pulled} input items to produce 10 results with {workers} workers and "
            f"chunksize={chunksize}: read-ahead is not bounded"
        )

    @pytest.mark.parametrize("chunksize", [1, 4])
    def test_user_exception_is_reraised_as_itself(
        self, conformance_backend: BackendSpec, chunksize: int
    ) -> None:
        got: list[int] = []
        results = procession.map(
            functools.partial(_tasks.fail_on, bad=5),
            range(20),
            backend=conformance_backend,
            chunksize=chunksize,
        )
        with pytest.raises(_tasks.ConformanceError, match="bad item 5") as info:
            got.extend(results)
        assert got == [0, 1, 2, 3, 4], "results before the failure are yielded, in order"
        cause = info.value.__cause__
        assert isinstance(cause, RemoteTraceback), f"__cause__ is {cause!r}"
        assert "fail_on" in cause.traceback_text
        assert "bad item 5" in cause.traceback_text

    def test_on_error_return_yields_exceptions_in_place(
        self, conformance_backend: BackendSpec
    ) -> None:
        got = list(
            procession.map(
                functools.partial(_tasks.fail_on, bad=3),
                range(8),
                backend=conformance_backend,
                chunksize=2,
                on_error="return",
            )
        )
        assert len(got) == 8
        assert isinstance(got[3], _tasks.ConformanceError)
        assert isinstance(got[3].__cause__, RemoteTraceback)
        assert [v for i, v in enumerate(got) if i != 3] == [0, 1, 2, 4, 5, 6, 7]

    def test_recipe_is_built_once_per_worker(self, conformance_backend: BackendSpec) -> None:
        # A fresh nonce makes a recipe no earlier test (or warm worker) has built.
        recipe = procession.Recipe(_tasks.make_token, uuid.uuid4().hex)
        # The worker receives the built Token where the Recipe stands.
        token: Any = recipe
        fn = functools.partial(_tasks.token_of, token=token)
        rows = list(procession.map(fn, range(40), backend=conformance_backend, chunksize=1))
        assert [row[0] for row in rows] == list(range(40))
        tokens_per_process: dict[int, set[str]] = {}
        for _, runner_pid, builder_pid, token_id in rows:
            assert runner_pid == builder_pid, "the recipe was built in another process"
            tokens_per_process.setdefault(runner_pid, set()).add(token_id)
        for pid, tokens in tokens_per_process.items():
            assert len(tokens) == 1, f"process {pid} built the recipe {len(tokens)} times"
        # A second map on the same workers reuses what they built.
        again = list(procession.map(fn, range(10), backend=conformance_backend, chunksize=1))
        for _, runner_pid, _, token_id in again:
            if runner_pid in tokens_per_process:
                assert {token_id} == tokens_per_process[runner_pid]

    def test_adapters_are_applied(self, conformance_backend: BackendSpec) -> None:
        # Registered for this test only: the suite runs inside its host's test
        # session and must leave the adapter registry as it found it.
        registered_before = find_reducer(_tasks.OpaqueHandle) is _tasks.reduce_opaque_handle
        procession.register_adapter(_tasks.OpaqueHandle, _tasks.reduce_opaque_handle)
        try:
            handle = _tasks.OpaqueHandle("conformance-handle")
            fn = functools.partial(_tasks.describe_handle, handle=handle)
            got = list(procession.map(fn, range(6), backend=conformance_backend, chunksize=2))
        finally:
            if not registered_before:
                procession.unregister_adapter(_tasks.OpaqueHandle)
        assert got == [(x, "conformance-handle", True) for x in range(6)]

    def test_tasks_run_in_the_declared_place(
        self, conformance_backend: BackendSpec, capabilities: Capabilities
    ) -> None:
        pids = set(procession.map(_tasks.pid_of, range(12), backend=conformance_backend))
        if not capabilities.isolated:
            assert pids == {os.getpid()}, "a non-isolated backend ran tasks in other processes"
            return
        assert os.getpid() not in pids, "an isolated backend ran a task in the caller"
        if not capabilities.remote:
            live = resolve_instance(conformance_backend).worker_pids()
            assert pids <= live, f"worker_pids() {sorted(live)} misses workers {sorted(pids)}"

    def test_executor_submit_map_shutdown(self, conformance_backend: BackendSpec) -> None:
        # On the warm instance: new workers per test would only cost start-up time
        # (initializer= and kill_workers() below do need their own).
        executor = procession.Executor(backend=resolve_instance(conformance_backend))
        with executor:
            assert executor.submit(pow, 2, 10).result(timeout=TEST_TIMEOUT) == 1024
            assert executor.submit(_tasks.add, 2, y=3).result(timeout=TEST_TIMEOUT) == 5
            failing: Future[int] = executor.submit(_tasks.fail_on, 3, bad=3)
            error = failing.exception(timeout=TEST_TIMEOUT)
            assert isinstance(error, _tasks.ConformanceError)
            assert isinstance(error.__cause__, RemoteTraceback)
            assert list(executor.map(_tasks.square, range(15))) == [x * x for x in range(15)]
            assert list(executor.map(_tasks.add, range(5), range(10, 15))) == [
                x + y for x, y in zip(range(5), range(10, 15), strict=True)
            ]
        with pytest.raises(RuntimeError):
            executor.submit(pow, 2, 2)
        # The executor did not own the backend: shutting it down left the workers running.
        assert list(procession.map(_tasks.square, [3], backend=conformance_backend)) == [9]

    def test_executor_initializer_runs_in_each_worker(
        self, conformance_backend: BackendSpec
    ) -> None:
        marker = uuid.uuid4().hex
        sibling: Backend | None = None
        if isinstance(conformance_backend, Backend):
            # An instance's workers exist already: a sibling with worker_setup=
            # (the bytes Executor(initializer=...) makes) gets new ones.
            serializer = get_serializer(None, conformance_backend.default_serializer)
            setup = encode_setup(serializer, _tasks.set_initialized, (marker,))
            sibling = _sibling(conformance_backend, setup)
            executor = procession.Executor(backend=sibling)
        else:
            limit = getattr(get_backend_class(conformance_backend), "max_workers", None)
            executor = procession.Executor(
                backend=conformance_backend,
                max_workers=min(2, limit or 2),
                initializer=_tasks.set_initialized,
                initargs=(marker,),
            )
        try:
            with executor:
                seen = executor.submit(_tasks.get_initialized).result(timeout=TEST_TIMEOUT)
                assert seen.count(marker) == 1, f"initializer ran {seen.count(marker)} times"
                values = list(executor.map(_tasks.square, range(10)))
                assert values == [x * x for x in range(10)]
        finally:
            if sibling is not None:
                sibling.shutdown(wait=True)

    def test_timeout_matches_capabilities(
        self, conformance_backend: BackendSpec, capabilities: Capabilities
    ) -> None:
        fn = functools.partial(_tasks.sleep_on, bad=2, seconds=30)
        if not capabilities.kill:
            # Never ignore an option silently: refused when map() is called.
            with pytest.raises(ValueError, match="timeout"):
                procession.map(fn, range(5), backend=conformance_backend, timeout=1)
            return
        got = list(
            procession.map(
                fn, range(5), backend=conformance_backend, timeout=1.0, on_error="return"
            )
        )
        assert [v for i, v in enumerate(got) if i != 2] == [0, 1, 3, 4]
        error = got[2]
        assert isinstance(error, TaskTimeoutError), f"got {error!r}"
        assert error.index == 2
        # The worker was replaced: the backend still works.
        assert list(procession.map(_tasks.square, range(6), backend=conformance_backend)) == [
            x * x for x in range(6)
        ]
        with pytest.raises(TaskTimeoutError):
            list(procession.map(fn, range(5), backend=conformance_backend, timeout=1.0))


@pytest.mark.timeout(TEST_TIMEOUT)
class CrashConformance(_Base):
    """Worker crashes: run only where the backend declares ``crash_detection``.

    Example (the crash half alone, for a backend already covered otherwise)::

        class TestCrashes(CrashConformance):
            backend = "process"
    """

    @pytest.mark.parametrize("crash", ["exit", "sigkill"])
    def test_crash_raises_worker_crashed_error(
        self, conformance_backend: BackendSpec, crash: str
    ) -> None:
        _require_crash_detection(resolve_instance(conformance_backend).capabilities)
        task = _tasks.exit_on if crash == "exit" else _tasks.sigkill_on
        with pytest.raises(WorkerCrashedError) as info:
            list(
                procession.map(
                    functools.partial(task, bad=4),
                    range(8),
                    backend=conformance_backend,
                    chunksize=1,
                )
            )
        error = info.value
        assert 4 in error.items, f"the error does not name the lost item: {error.items}"
        if error.exitcode is not None:
            expected = 3 if crash == "exit" else -9
            assert error.exitcode == expected
        if crash == "sigkill" and error.exitcode is not None:
            assert error.signal_name == "SIGKILL"
        # The dead worker was replaced: the backend still works.
        assert list(procession.map(_tasks.square, range(10), backend=conformance_backend)) == [
            x * x for x in range(10)
        ]

    def test_crash_with_on_error_return(self, conformance_backend: BackendSpec) -> None:
        _require_crash_detection(resolve_instance(conformance_backend).capabilities)
        got = list(
            procession.map(
                functools.partial(_tasks.exit_on, bad=1),
                range(4),
                backend=conformance_backend,
                chunksize=1,
                on_error="return",
            )
        )
        assert isinstance(got[1], WorkerCrashedError)
        assert [v for i, v in enumerate(got) if i != 1] == [0, 2, 3]

    def test_retries_rerun_items_lost_to_a_crash(
        self, conformance_backend: BackendSpec, tmp_path: Path
    ) -> None:
        _require_crash_detection(resolve_instance(conformance_backend).capabilities)
        fn = functools.partial(_tasks.crash_once, bad=3, marker=str(tmp_path / "crashed"))
        got = list(
            procession.map(fn, range(10), backend=conformance_backend, chunksize=2, retries=1)
        )
        assert got == list(range(10))
        assert (tmp_path / "crashed").exists(), "the crash never happened"

    def test_kill_workers_stops_a_hung_task(self, conformance_backend: BackendSpec) -> None:
        _require_crash_detection(resolve_instance(conformance_backend).capabilities)
        sibling: Backend | None = None
        if isinstance(conformance_backend, Backend):
            # An executor never stops an instance it was given: give it its own.
            sibling = _sibling(conformance_backend, None, workers=1)
            executor = procession.Executor(backend=sibling)
        else:
            executor = procession.Executor(backend=conformance_backend, max_workers=1)
        try:
            hung = executor.submit(_tasks.sleep_on, 0, bad=0, seconds=60)
            executor.kill_workers()
            if not hung.cancelled():  # cancelled before it started, or stopped running
                error = hung.exception(timeout=TEST_TIMEOUT)
                assert isinstance(error, WorkerCrashedError), f"got {error!r}"
            if sibling is None:
                assert executor.backend.worker_pids() == set()
        finally:
            executor.shutdown(wait=False)
            if sibling is not None:
                sibling.shutdown(wait=False, kill=True)
                assert sibling.worker_pids() == set()


class BackendConformance(CoreConformance, CrashConformance):
    """The whole conformance suite; subclass it and name your backend.

    Example::

        from procession.testing import BackendConformance

        class TestInline(BackendConformance):
            backend = "inline"

    Tests that need a capability the backend does not declare are skipped
    with the reason (``-rs`` lists them).
    """
