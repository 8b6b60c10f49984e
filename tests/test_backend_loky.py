"""The ``loky`` backend's own options and promises.

Fault handling shared with the other process backends is in test_faults.py.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _faults_helpers import act

import procession
from procession.backends.loky import LokyBackend
from procession.errors import BackendUnavailableError, TaskTimeoutError, WorkerCrashedError


@pytest.fixture
def backend() -> Iterator[LokyBackend]:
    pool = LokyBackend(workers=2)
    yield pool
    pool.shutdown(wait=False, kill=True)


def test_registered_with_its_capabilities() -> None:
    info = procession.available_backends()["loky"]
    assert info.usable
    assert info.install_hint == "pip install 'procession[loky]'"
    assert info.capabilities is not None
    assert info.capabilities.isolated and info.capabilities.kill
    assert info.capabilities.crash_detection
    assert LokyBackend.default_serializer == "cloudpickle"


def test_missing_loky_names_the_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes ``import loky`` fail exactly as if it were not installed.
    monkeypatch.setitem(sys.modules, "loky", None)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'procession\[loky\]'"):
        LokyBackend.check_available()
    with pytest.raises(BackendUnavailableError, match="loky"):
        LokyBackend(workers=1).start()


def test_bad_start_method() -> None:
    with pytest.raises(ValueError, match=r"start_method='fork'.*loky_init_main"):
        LokyBackend(start_method="fork")


@pytest.mark.timeout(30)
def test_cloudpickle_by_default(backend: LokyBackend) -> None:
    offset = 10
    assert list(procession.map(lambda x: x + offset, [1, 2], backend=backend)) == [11, 12]
    assert len(backend.worker_pids()) == 2


@pytest.mark.timeout(30)
def test_timeout_reruns_the_bystander(backend: LokyBackend, tmp_path: Path) -> None:
    """Killing a hung task replaces the whole executor: the task running beside it is
    re-run (documented), and its result still comes exactly once."""
    runs = tmp_path / "runs"
    # The bystander runs from about 0.2 s to 0.6 s: across the kill at 0.5 s.
    items = [("hang",), ("sleep", 0.2, "first"), ("record", str(runs), "bystander", 0.4)]
    results = list(
        procession.map(act, items, backend=backend, chunksize=1, timeout=0.5, on_error="return")
    )
    assert isinstance(results[0], TaskTimeoutError)
    assert results[1:] == ["first", "bystander"]
    assert runs.read_text().split().count("bystander") in (1, 2)


@pytest.mark.timeout(30)
def test_workers_ignore_sigint(backend: LokyBackend) -> None:
    slow = [("sleep", 0.3, 1), ("sleep", 0.3, 2)]
    assert list(procession.map(act, slow, backend=backend, chunksize=1)) == [1, 2]
    pids = backend.worker_pids()
    for pid in pids:
        os.kill(pid, signal.SIGINT)
    time.sleep(0.3)
    assert list(procession.map(abs, [-3, -4], backend=backend)) == [3, 4]
    assert backend.worker_pids() == pids


@pytest.mark.timeout(30)
def test_crash_names_the_signal_and_heals(backend: LokyBackend) -> None:
    results = list(
        procession.map(act, [("kill", 0.2), ("ok", 1)], backend=backend, on_error="return")
    )
    assert isinstance(results[0], WorkerCrashedError)
    assert results[0].signal_name == "SIGKILL"
    assert "SIGKILL" in str(results[0])
    assert results[1] == 1
    assert list(procession.map(abs, [-5], backend=backend)) == [5]


@pytest.mark.timeout(30)
def test_shutdown_then_submit_is_refused() -> None:
    pool = LokyBackend(workers=1)
    assert list(procession.map(abs, [-1], backend=pool)) == [1]
    pool.shutdown(wait=True)
    assert pool.worker_pids() == set()
    with pytest.raises(RuntimeError, match="shut down"):
        list(procession.map(abs, [-1], backend=pool))


def shout(x: int) -> int:
    import logging
    import sys

    print(f"out {x}")
    print(f"err {x}", file=sys.stderr)
    logging.getLogger("procession.tests.loky").warning("log %d", x)
    return x


@pytest.mark.timeout(30)
def test_worker_output_reaches_the_parent(
    backend: LokyBackend,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("WARNING", logger="procession.tests.loky")
    assert list(procession.map(shout, [1, 2], backend=backend, chunksize=1)) == [1, 2]
    deadline = time.monotonic() + 5  # output travels beside the results, not with them
    out = err = ""
    while time.monotonic() < deadline and not (
        all(f"out {x}" in out and f"err {x}" in err for x in (1, 2)) and len(caplog.records) >= 2
    ):
        captured = capsys.readouterr()
        out, err = out + captured.out, err + captured.err
        time.sleep(0.05)
    assert "out 1" in out and "out 2" in out
    assert "err 1" in err and "err 2" in err
    assert sorted(r.getMessage() for r in caplog.records) == ["log 1", "log 2"]
    assert all(r.procession_worker in backend.worker_pids() for r in caplog.records)  # type: ignore[attr-defined]


@pytest.mark.timeout(30)
def test_private_directory_is_removed_and_stale_ones_swept(tmp_path: Path) -> None:
    import subprocess
    import tempfile

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = Path(tempfile.gettempdir()) / f"procession-loky-{dead.stdout.strip()}-stale"
    stale.mkdir()
    (stale / "started").write_text("1 2\n")
    pool = LokyBackend(workers=1)
    assert list(procession.map(abs, [-1], backend=pool)) == [1]
    assert not stale.exists()  # its parent died without cleaning up: swept
    own = Path(pool._directory)
    assert own.is_dir()
    pool.shutdown(wait=True)
    assert not own.exists()
