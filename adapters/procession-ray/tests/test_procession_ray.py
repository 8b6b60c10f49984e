"""The Ray backend against a real local Ray: the conformance suite, and Ray specifics."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

import procession
from procession.testing import BackendConformance, _tasks
from procession.testing._tasks import pid_of


class TestRayConformance(BackendConformance):
    backend = "ray"


def test_discovered_through_its_entry_point() -> None:
    info = procession.available_backends()["ray"]
    assert info.usable, info.error
    assert info.origin == "distribution procession-ray"
    assert info.capabilities == procession.Capabilities(
        isolated=True, kill=True, crash_detection=True, remote=True, buffer_store=True
    )


def test_an_instance_shares_the_session_and_stops_its_actors() -> None:
    backend = procession.create_backend("ray", workers=1)
    with backend:
        pids = set(procession.map(pid_of, range(4), backend=backend))
        assert len(pids) == 1
        assert pids <= backend.worker_pids()
    assert backend.worker_pids() == set()
    # The shared session is still up for everyone else.
    assert list(procession.map(abs, [-3], backend="ray")) == [3]


DRIVER = textwrap.dedent(
    """
    import os, sys
    import procession
    from procession.testing._tasks import pid_of, square

    backend = procession.create_backend("ray", workers=2, address=sys.argv[1])
    with backend:
        print(list(procession.map(square, range(6), backend=backend)))
        print(len(set(procession.map(pid_of, range(8), backend=backend, chunksize=1))))
    """
)


@pytest.mark.timeout(90)
def test_address_connects_to_a_running_cluster() -> None:
    """A second driver process joins this session's Ray instance through address=."""
    import ray

    address = ray.get_runtime_context().gcs_address
    # Not under `uv run` semantics: the workers share this machine's environment.
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, address],
        capture_output=True,
        text=True,
        timeout=80,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-2] == str([x * x for x in range(6)])
    assert 1 <= int(lines[-1]) <= 2


def test_shutdown_without_wait_lets_submitted_tasks_finish() -> None:
    executor = procession.Executor(backend="ray", max_workers=1)
    futures = [executor.submit(_tasks.sleep_on, i, bad=i, seconds=0.2) for i in range(3)]
    executor.shutdown(wait=False)  # returns at once; the tasks still run
    assert [future.result(timeout=60) for future in futures] == [0, 1, 2]
    deadline = time.monotonic() + 30
    while executor.backend.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not executor.backend.started


def test_large_arguments_go_through_the_object_store_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 2 MiB array given to 8 tasks is put in Ray's object store once; each task
    gets a writable copy of its own; the tasks' own bytes stay small."""
    np = pytest.importorskip("numpy")
    from procession_ray import RayBackend

    array = np.arange(1 << 18, dtype=np.float64)
    stored: list[int] = []
    sent: list[tuple[int, int]] = []
    real_store = RayBackend.store_buffer
    real_submit = RayBackend.submit_with_buffers

    def counting_store(self: RayBackend, data: bytes) -> procession.StoredBuffer:
        stored.append(len(data))
        return real_store(self, data)

    def recording_submit(self: RayBackend, task: bytes, buffers: list) -> procession.TaskFuture:  # type: ignore[type-arg]
        sent.append((len(task), len(buffers)))
        return real_submit(self, task, buffers)

    monkeypatch.setattr(RayBackend, "store_buffer", counting_store)
    monkeypatch.setattr(RayBackend, "submit_with_buffers", recording_submit)

    def total(pair: tuple) -> float:  # type: ignore[type-arg]
        x, offset = pair
        x[0] = -1.0  # a writable copy of its own
        return float(x.sum()) + offset

    pairs = [(array, i) for i in range(8)]
    got = list(procession.map(total, pairs, backend="ray", chunksize=1))
    assert got == [float(array.sum()) - 1.0 + i for i in range(8)]
    assert array[0] == 0.0
    assert stored == [array.nbytes]
    assert len(sent) == 8 and all(size < 64 * 1024 and count == 1 for size, count in sent)
