"""The ``multiprocessing`` backend's own options and promises.

Fault handling shared with the other process backends is in test_faults.py.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _faults_helpers import act

import procession
from procession.backends.base import TaskFuture
from procession.backends.multiprocessing import MultiprocessingBackend, describe_exit
from procession.errors import SerializationError, WorkerCrashedError


@pytest.fixture
def backend() -> object:
    pool = MultiprocessingBackend(workers=2)
    yield pool
    pool.shutdown(wait=False, kill=True)


def test_registered_with_its_capabilities() -> None:
    info = procession.available_backends()["multiprocessing"]
    assert info.usable
    assert info.capabilities is not None
    assert info.capabilities.isolated and info.capabilities.kill
    assert info.capabilities.crash_detection
    assert MultiprocessingBackend.default_serializer == "pickle"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", multiprocessing.get_all_start_methods())
def test_every_start_method_works(method: str) -> None:
    with MultiprocessingBackend(workers=2, start_method=method) as pool:
        assert pool.start_method == method
        assert list(procession.map(abs, range(-10, 0), backend=pool)) == list(range(10, 0, -1))
        assert len(pool.worker_pids()) == 2


def test_bad_options_name_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"start_method='thread'.*spawn"):
        MultiprocessingBackend(start_method="thread")
    with pytest.raises(ValueError, match="max_tasks_per_worker"):
        MultiprocessingBackend(max_tasks_per_worker=0)
    with pytest.raises(ValueError, match="workers"):
        MultiprocessingBackend(workers=0)


@pytest.mark.timeout(30)
def test_pickle_is_the_default_serializer(backend: MultiprocessingBackend) -> None:
    with pytest.raises(SerializationError, match="pickle"):
        list(procession.map(lambda x: x + 1, [1, 2], backend=backend))
    assert list(
        procession.map(lambda x: x + 1, [1, 2], backend=backend, serializer="cloudpickle")
    ) == [2, 3]


@pytest.mark.timeout(30)
def test_max_tasks_per_worker_replaces_workers() -> None:
    with MultiprocessingBackend(workers=1, max_tasks_per_worker=2) as pool:
        pids = list(procession.map(act, [("pid",)] * 6, backend=pool, chunksize=1))
        assert len(set(pids)) == 3
        assert [pids[0], pids[2], pids[4]] == [pids[1], pids[3], pids[5]]
        deadline = time.monotonic() + 5
        while len(pool.worker_pids()) != 1 and time.monotonic() < deadline:
            time.sleep(0.05)  # the last retired worker is on its way out
        assert len(pool.worker_pids()) == 1


@pytest.mark.timeout(30)
def test_workers_ignore_sigint(backend: MultiprocessingBackend) -> None:
    # Two slow items, one per worker: both workers are up and past their set-up.
    slow = [("sleep", 0.3, 1), ("sleep", 0.3, 2)]
    assert list(procession.map(act, slow, backend=backend, chunksize=1)) == [1, 2]
    pids = backend.worker_pids()
    assert len(pids) == 2
    for pid in pids:
        os.kill(pid, signal.SIGINT)
    time.sleep(0.3)
    assert backend.worker_pids() == pids
    assert list(procession.map(abs, [-3, -4], backend=backend)) == [3, 4]


@pytest.mark.timeout(30)
def test_shutdown_wait_finishes_queued_work() -> None:
    pool = MultiprocessingBackend(workers=1)
    futures = [pool.submit(_task(("sleep", 0.05, i))) for i in range(5)]
    pool.shutdown(wait=True)
    assert all(f.done() and not f.exception() for f in futures)
    assert pool.worker_pids() == set()
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(_task(("ok", 1)))


@pytest.mark.timeout(30)
def test_kill_task_fails_the_future_and_replaces_the_worker(
    backend: MultiprocessingBackend,
) -> None:
    future = backend.submit(_task(("hang",)))
    other = backend.submit(_task(("sleep", 0.5, "bystander")))
    deadline = time.monotonic() + 10
    while future.started_at is None and time.monotonic() < deadline:
        time.sleep(0.01)
    victim = future.worker
    backend.kill_task(future)
    with pytest.raises(WorkerCrashedError, match="SIGKILL"):
        future.result(timeout=5)
    assert _decode(other.result(timeout=10)) == "bystander"
    deadline = time.monotonic() + 5
    while (victim in backend.worker_pids() or len(backend.worker_pids()) != 2) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert victim not in backend.worker_pids()
    assert len(backend.worker_pids()) == 2
    backend.kill_task(future)  # already finished: nothing happens
    backend.kill_task(TaskFuture())  # never submitted: nothing happens


def test_describe_exit() -> None:
    assert describe_exit(12, -9) == "worker pid 12 was killed by SIGKILL (exit code -9)"
    assert describe_exit(12, 3) == "worker pid 12 exited with code 3"
    assert describe_exit(12, None) == "worker pid 12 stopped responding"


UNGUARDED_SCRIPT = """
import procession
print(list(procession.map(abs, [-1], backend="multiprocessing", workers=1)))
"""


@pytest.mark.timeout(60)
def test_script_without_main_guard_gets_a_clear_error(tmp_path: Path) -> None:
    """Workers that die while starting break the pool once, with advice, no endless respawn."""
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=50,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
        cwd=tmp_path,
    )
    assert done.returncode != 0
    assert "WorkerCrashedError" in done.stderr
    assert "died while starting" in done.stderr
    assert "__main__" in done.stderr


def _task(item: tuple[object, ...]) -> bytes:
    from procession import protocol
    from procession.serialization.serializers import get_serializer

    serializer = get_serializer("pickle")
    return protocol.encode_task(
        serializer,
        protocol.new_run_id(),
        protocol.encode_function(act, serializer),
        serializer.dumps([item]),
        star=False,
        stop_on_error=True,
    )


def _decode(result: bytes) -> object:
    from procession import protocol
    from procession.serialization.serializers import get_serializer

    decoded = protocol.decode_result(result, get_serializer("pickle"))
    assert not decoded.errors and decoded.task_error is None
    return decoded.values[0]


def shout(x: int) -> int:
    import logging
    import sys

    print(f"out {x}")
    print(f"err {x}", file=sys.stderr)
    logging.getLogger("procession.tests.worker").warning("log %d", x)
    try:
        raise KeyError(x)
    except KeyError:
        logging.getLogger("procession.tests.worker").exception("failed %d", x)
    return x


@pytest.mark.timeout(30)
def test_worker_output_reaches_the_parent(
    backend: MultiprocessingBackend,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("WARNING", logger="procession.tests.worker")
    assert list(procession.map(shout, [1, 2], backend=backend, chunksize=1)) == [1, 2]
    captured = capsys.readouterr()
    assert sorted(line for line in captured.out.splitlines() if line.startswith("out")) == [
        "out 1",
        "out 2",
    ]
    assert "err 1" in captured.err and "err 2" in captured.err
    messages = [r.getMessage() for r in caplog.records]
    assert "log 1" in messages and "failed 2" in messages
    assert all(r.procession_worker in backend.worker_pids() for r in caplog.records)  # type: ignore[attr-defined]
    failed = next(r for r in caplog.records if r.getMessage() == "failed 1")
    assert "KeyError: 1" in (failed.exc_text or "")
