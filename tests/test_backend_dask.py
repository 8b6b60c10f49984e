"""The ``dask`` backend: embedded LocalCluster, ``client=`` reuse, ``address=`` with a
cluster started from the ``dask`` command line, crashes, kills and up-front refusals.

The backend-parametrised suite (conformance, API, pipeline, workloads) also runs on
``dask`` through the warm shared LocalCluster; these tests cover what is Dask's own.
Functions sent to workers are lambdas (cloudpickle sends them by value) or live in
``procession.testing._tasks``, so that ``dask worker`` processes started outside
pytest can load them.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import procession
from procession.api import resolve_backend
from procession.backends.dask import DaskBackend
from procession.errors import (
    BackendUnavailableError,
    RemoteTraceback,
    TaskTimeoutError,
    WorkerCrashedError,
)
from procession.testing import _tasks

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.timeout(60)


def shared() -> DaskBackend:
    """The warm LocalCluster that procession.map keeps for backend="dask"."""
    backend = resolve_backend("dask", None)
    assert isinstance(backend, DaskBackend)
    return backend


# -- the embedded LocalCluster ------------------------------------------------------


def test_map_ordered_and_unordered() -> None:
    items = list(range(-30, 70))
    assert list(procession.map(_tasks.square, items, backend="dask")) == [x * x for x in items]
    for chunksize in (1, 7):
        got = list(
            procession.map(
                lambda x: (time.sleep(0.01 if x % 5 == 0 else 0), x)[1],
                items,
                backend="dask",
                chunksize=chunksize,
                ordered=False,
            )
        )
        assert sorted(got) == items
    backend = shared()
    assert backend.embedded
    assert backend.capabilities == procession.Capabilities(
        isolated=True,
        kill=True,
        crash_detection=True,
        remote=True,
        buffer_store=True,
        memory_limit=True,
        threads_per_worker=True,
        env=True,
    )
    pids = set(procession.map(_tasks.pid_of, range(20), backend="dask", chunksize=1))
    assert os.getpid() not in pids
    assert pids <= backend.worker_pids(), "tasks ran outside the cluster's worker processes"


def test_exceptions_come_back_as_themselves_with_the_remote_traceback() -> None:
    got: list[int] = []
    with pytest.raises(_tasks.ConformanceError, match="bad item 6") as info:
        got.extend(
            procession.map(functools.partial(_tasks.fail_on, bad=6), range(12), backend="dask")
        )
    assert got == list(range(6))
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "fail_on" in cause.traceback_text

    returned = list(
        procession.map(
            functools.partial(_tasks.fail_on, bad=2),
            range(6),
            backend="dask",
            chunksize=3,
            on_error="return",
        )
    )
    assert isinstance(returned[2], _tasks.ConformanceError)
    assert isinstance(returned[2].__cause__, RemoteTraceback)
    assert [v for i, v in enumerate(returned) if i != 2] == [0, 1, 3, 4, 5]


def test_recipes_are_built_once_per_worker_process() -> None:
    token: Any = procession.Recipe(_tasks.make_token, uuid.uuid4().hex)
    fn = functools.partial(_tasks.token_of, token=token)
    rows = [
        *procession.map(fn, range(30), backend="dask", chunksize=1),
        *procession.map(fn, range(30), backend="dask", chunksize=4),
    ]
    built: dict[int, set[str]] = {}
    for _, runner, builder, token_id in rows:
        assert runner == builder, "the recipe was built in another process than the runner"
        built.setdefault(runner, set()).add(token_id)
    assert built and all(len(ids) == 1 for ids in built.values()), built
    assert set(built) <= shared().worker_pids()


def test_worker_killed_mid_task_is_reported_or_retried(tmp_path: Path) -> None:
    """SIGKILL the worker process that runs item 3 while it runs (from outside)."""
    for retries in (0, 1):
        marker = tmp_path / f"victim-{retries}"

        def task(x: int, marker: str = str(marker)) -> int:
            if x == 3 and not os.path.exists(marker):
                with open(marker + ".tmp", "w") as f:
                    f.write(str(os.getpid()))
                os.rename(marker + ".tmp", marker)
                time.sleep(30)
            return x

        killer = _Killer(marker)
        killer.start()
        try:
            got = list(
                procession.map(
                    task,
                    range(8),
                    backend="dask",
                    chunksize=1,
                    retries=retries,
                    on_error="return",
                )
            )
        finally:
            killer.join(timeout=30)
        assert killer.killed is not None, "the victim never started"
        if retries:
            assert got == list(range(8)), "the item lost to the crash was not re-run"
            continue
        assert [v for i, v in enumerate(got) if i != 3] == [0, 1, 2, 4, 5, 6, 7]
        error = got[3]
        assert isinstance(error, WorkerCrashedError), f"got {error!r}"
        assert error.items == (3,)
        assert error.exitcode == -signal.SIGKILL
        assert error.signal_name == "SIGKILL"
        assert str(killer.killed) in str(error)
    # The nanny replaced the dead worker: the cluster still works.
    assert list(procession.map(_tasks.square, range(5), backend="dask")) == [0, 1, 4, 9, 16]


def test_only_the_task_that_crashed_its_worker_is_blamed() -> None:
    """Round after round, the items beside a crash (queued behind it, or finished just
    before it on the same worker, their results lost with it) come back as values."""
    crashes = [(_tasks.sigkill_on, -signal.SIGKILL), (_tasks.exit_on, 3)]
    for round_ in range(4):
        task, exitcode = crashes[round_ % 2]
        got = list(
            procession.map(
                functools.partial(task, bad=1),
                [0, 1, 2],
                backend="dask",
                chunksize=1,
                timeout=10.0,  # counts from each start: time lost to restarts does not
                on_error="return",
            )
        )
        assert got[0] == 0 and got[2] == 2, f"round {round_}: {got}"
        assert isinstance(got[1], WorkerCrashedError), f"round {round_}: {got}"
        assert got[1].items == (1,)
        assert got[1].exitcode == exitcode


class _Killer(threading.Thread):
    """Waits for a task to write its pid to ``marker``, then SIGKILLs that process."""

    def __init__(self, marker: Path) -> None:
        super().__init__(daemon=True)
        self.marker = marker
        self.killed: int | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 30
        while not self.marker.exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        pid = int(self.marker.read_text())
        time.sleep(0.1)  # let the task get well into its sleep
        os.kill(pid, signal.SIGKILL)
        self.killed = pid


def test_timeout_kills_the_late_task_and_its_worker_is_replaced() -> None:
    before = shared().worker_pids()
    got = list(
        procession.map(
            functools.partial(_tasks.sleep_on, bad=1, seconds=30),
            range(4),
            backend="dask",
            timeout=1.0,
            on_error="return",
        )
    )
    assert isinstance(got[1], TaskTimeoutError), got
    assert [v for i, v in enumerate(got) if i != 1] == [0, 2, 3]
    assert list(procession.map(_tasks.square, range(6), backend="dask")) == [
        x * x for x in range(6)
    ]
    after = shared().worker_pids()
    assert len(after) == len(before)
    assert after != before, "the late task's worker process was not replaced"


def test_own_cluster_runs_the_initializer_once_per_worker_and_kill_stops_a_hung_task(
    tmp_path: Path,
) -> None:
    marker = uuid.uuid4().hex
    executor = procession.Executor(
        backend="dask", workers=2, initializer=_tasks.set_initialized, initargs=(marker,)
    )
    try:
        backend = executor.backend
        assert isinstance(backend, DaskBackend) and backend is not shared()
        seen = list(
            executor.map(
                lambda _: (os.getpid(), _tasks.get_initialized().count(marker)),
                range(30),
                chunksize=1,
            )
        )
        assert {count for _, count in seen} == {1}, "an initializer ran twice (or never)"
        assert {pid for pid, _ in seen} <= backend.worker_pids()
        assert len(backend.worker_pids()) == 2

        started = tmp_path / "started"
        hung = executor.submit(lambda: (started.touch(), time.sleep(60)))
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        executor.kill_workers()
        assert isinstance(hung.exception(timeout=30), WorkerCrashedError)
        assert backend.worker_pids() == set()
        assert backend.client is None
    finally:
        executor.shutdown(wait=False)


# -- client= ------------------------------------------------------------------------


def test_client_is_reused_and_left_open() -> None:
    # Threads in this process: cheap to start, and a cluster that cannot kill.
    with (
        distributed.LocalCluster(
            processes=False,
            n_workers=1,
            threads_per_worker=2,
            dashboard_address=None,
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        backend = procession.create_backend("dask", client=client)
        assert isinstance(backend, DaskBackend) and not backend.embedded
        assert backend.workers == 2, "workers defaults to the cluster's thread count"
        assert list(procession.map(_tasks.square, range(20), backend=backend)) == [
            x * x for x in range(20)
        ]
        caps = backend.capabilities
        assert not caps.kill and not caps.isolated, caps
        # Never ignore an option silently: no kill, so timeout= is refused at call time.
        with pytest.raises(ValueError, match="timeout"):
            procession.map(_tasks.square, range(3), backend=backend, timeout=1)
        backend.shutdown()
        assert backend.client is None
        assert client.status == "running", "the caller's client was closed"
        assert client.submit(sum, [1, 2, 3]).result(timeout=30) == 6


# -- address= with `dask scheduler` / `dask worker` programs ------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _dask_command() -> list[str]:
    script = Path(sys.executable).with_name("dask")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dask"]


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the program's process group (nanny and worker), SIGKILL if it lingers."""
    if process.poll() is None:
        with _suppress_lookup():
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    with _suppress_lookup():
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


class _suppress_lookup:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, *_: Any) -> bool:
        return exc_type is not None and issubclass(exc_type, ProcessLookupError)


@pytest.fixture
def cli_cluster(tmp_path: Path) -> Iterator[str]:
    """`dask scheduler` and two `dask worker` programs on 127.0.0.1; yields the address."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = _dask_command()
    common: dict[str, Any] = {
        "stdout": subprocess.DEVNULL,
        "stderr": subprocess.DEVNULL,
        "start_new_session": True,
        "cwd": tmp_path,
    }
    programs = [
        subprocess.Popen(
            [
                *dask,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-dashboard",
                "--dashboard-address",
                "127.0.0.1:0",
            ],
            **common,
        )
    ]
    try:
        for _ in range(2):
            programs.append(
                subprocess.Popen(
                    [
                        *dask,
                        "worker",
                        address,
                        "--nthreads",
                        "1",
                        "--host",
                        "127.0.0.1",
                        "--no-dashboard",
                        "--local-directory",
                        str(tmp_path),
                    ],
                    **common,
                )
            )
        _wait_for_workers(address, 2, programs)
        yield address
    finally:
        for program in reversed(programs):  # workers first, then the scheduler
            _stop(program)


def _wait_for_workers(address: str, count: int, programs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        for program in programs:
            assert program.poll() is None, f"{program.args} exited with {program.returncode}"
        try:
            with distributed.Client(address, timeout=5, set_as_default=False) as client:
                client.wait_for_workers(count, timeout=deadline - time.monotonic())
                return
        except (OSError, TimeoutError):
            time.sleep(0.2)
    raise AssertionError(f"the dask cluster at {address} did not get {count} workers")


@pytest.mark.timeout(90)
def test_address_runs_on_a_cluster_started_from_the_command_line(cli_cluster: str) -> None:
    backend = procession.create_backend("dask", address=cli_cluster)
    try:
        assert isinstance(backend, DaskBackend)
        assert backend.workers == 2, "workers defaults to the cluster's thread count"
        assert backend.capabilities.kill and backend.capabilities.remote
        got = list(procession.map(_tasks.square, range(50), backend=backend))
        assert got == [x * x for x in range(50)]
        offset = 7
        assert list(procession.map(lambda x: x + offset, range(10), backend=backend)) == [
            x + 7 for x in range(10)
        ]
        pids = set(procession.map(_tasks.pid_of, range(20), backend=backend, chunksize=1))
        assert os.getpid() not in pids and len(pids) == 2, pids
        assert backend.worker_pids() == set(), "a remote cluster's workers are not ours"
        with pytest.raises(_tasks.ConformanceError) as info:
            list(
                procession.map(functools.partial(_tasks.fail_on, bad=1), range(3), backend=backend)
            )
        assert isinstance(info.value.__cause__, RemoteTraceback)
        # timeout= kills the late task's worker process through its nanny.
        late = list(
            procession.map(
                functools.partial(_tasks.sleep_on, bad=2, seconds=60),
                range(4),
                backend=backend,
                timeout=1.0,
                on_error="return",
            )
        )
        assert isinstance(late[2], TaskTimeoutError)
        assert [v for i, v in enumerate(late) if i != 2] == [0, 1, 3]
        assert list(procession.map(_tasks.square, range(8), backend=backend)) == [
            x * x for x in range(8)
        ]
        with procession.Executor(backend=backend) as executor:
            assert executor.submit(pow, 3, 4).result(timeout=30) == 81
    finally:
        backend.shutdown()
    assert backend.client is None


# -- options and availability ------------------------------------------------------


def test_bad_options_are_refused_up_front() -> None:
    with pytest.raises(ValueError, match="not both"):
        procession.create_backend("dask", address="tcp://127.0.0.1:1", client=object())
    with pytest.raises(ValueError, match="n_workers"):
        procession.create_backend("dask", address="tcp://127.0.0.1:1", n_workers=3)
    with pytest.raises(TypeError, match="address"):
        procession.create_backend("dask", address=8786)
    with pytest.raises(ValueError, match="does not accept"):
        procession.Executor(backend="dask", max_tasks_per_child=3)
    info = procession.available_backends()["dask"]
    assert info.usable and info.capabilities == DaskBackend.capabilities
    # Nothing was started by any of this.
    assert not procession.create_backend("dask", workers=1).started


def test_missing_distributed_names_the_pip_install() -> None:
    code = (
        "import sys; sys.modules['distributed'] = None\n"
        "import procession\n"
        "info = procession.available_backends()['dask']\n"
        "assert not info.usable, info\n"
        "try:\n"
        "    procession.create_backend('dask')\n"
        "except procession.BackendUnavailableError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'procession[dask]'" in result.stdout, result.stdout + result.stderr
    assert issubclass(BackendUnavailableError, ImportError)


@pytest.mark.timeout(90)
def test_only_a_bounded_prefetch_reaches_dask() -> None:
    """Issue 17 item 7: tasks wait here, cancellable, until a worker will soon take them."""
    backend = procession.create_backend("dask", workers=1)
    try:
        ex = procession.Executor(backend=backend)
        futures = [ex.submit(time.sleep, 0.3) for _ in range(12)]
        client = backend.client
        assert client is not None
        assert len(client.futures) <= 2  # 2 x workers handed to Dask, the rest held here
        ex.shutdown(wait=True, cancel_futures=True)
        assert sum(f.cancelled() for f in futures) >= 9
        assert all(f.exception() is None for f in futures if not f.cancelled())
    finally:
        backend.shutdown(wait=True)


# -- large arguments: scattered once per map ----------------------------------------


def _buffer_keys(client: Any) -> set[str]:
    held = client.has_what()
    return {key for keys in held.values() for key in keys if "procession-buffer-" in str(key)}


def test_large_arguments_are_scattered_once_not_sent_with_each_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    np = pytest.importorskip("numpy")
    array = np.arange(1 << 18, dtype=np.float64)  # 2 MiB
    backend = shared()
    sent: list[tuple[int, int]] = []
    real = DaskBackend.submit_with_buffers

    def recording(self: DaskBackend, task: bytes, buffers: list[Any]) -> Any:
        sent.append((len(task), len(buffers)))
        return real(self, task, buffers)

    monkeypatch.setattr(DaskBackend, "submit_with_buffers", recording)

    def total(x: Any, offset: int) -> float:
        x[0] = -1.0  # every task has its own writable copy
        return float(x.sum()) + offset

    expected = [float(array.sum()) - 1.0 + i for i in range(8)]
    pairs = [(array, i) for i in range(8)]
    got = list(procession.map(lambda p: total(*p), pairs, backend=backend, chunksize=1))
    assert got == expected
    assert array[0] == 0.0  # the parent's array is untouched
    assert len(sent) == 8
    assert all(size < 64 * 1024 and count == 1 for size, count in sent), sent
    # The function carries it (a partial): stored once, delivered with every task.
    sent.clear()
    got = list(
        procession.map(functools.partial(total, array), range(8), backend=backend, chunksize=1)
    )
    assert got == expected
    assert all(size < 64 * 1024 and count == 1 for size, count in sent), sent
    # Released when the map ends: the cluster keeps no buffer of ours.
    client = backend.client
    deadline = time.monotonic() + 10
    while _buffer_keys(client) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _buffer_keys(client) == set()


def test_a_scattered_buffer_lost_with_its_worker_is_scattered_again(tmp_path: Path) -> None:
    """One worker holds the only copy; it dies mid-map; the retries still get the data."""
    np = pytest.importorskip("numpy")
    array = np.ones(1 << 18)
    marker = str(tmp_path / "died")

    def die_once(pair: tuple[Any, int]) -> float:
        x, i = pair
        if i == 2 and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return float(x.sum()) + i

    backend = procession.create_backend("dask", workers=1)
    pairs = [(array, i) for i in range(6)]
    try:
        got = list(procession.map(die_once, pairs, backend=backend, chunksize=1, retries=2))
        assert got == [float(array.sum()) + i for i in range(6)]
        assert os.path.exists(marker)
    finally:
        backend.shutdown()
