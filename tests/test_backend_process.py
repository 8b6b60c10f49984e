"""What is particular to the ``process`` backend (faults are in test_faults.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

import procession


def shout(x: int) -> int:
    print(f"line from item {x}")
    print(f"error line from item {x}", file=sys.stderr)
    return x


def log_something(x: int) -> int:
    logging.getLogger("procession.tests.worker").warning("warned about %d", x)
    return x


def worker_pid(_: object) -> int:
    return os.getpid()


def test_worker_prints_reach_the_parent_streams(capsys: pytest.CaptureFixture[str]) -> None:
    with procession.create_backend("process", workers=2) as backend:
        assert list(procession.map(shout, range(3), backend=backend, chunksize=1)) == [0, 1, 2]
    out, err = capsys.readouterr()
    for x in range(3):
        assert f"line from item {x}\n" in out
        assert f"error line from item {x}\n" in err


def test_worker_log_records_reach_parent_handlers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="procession.tests.worker")
    with procession.create_backend("process", workers=2) as backend:
        list(procession.map(log_something, range(4), backend=backend, chunksize=1))
        pids = backend.worker_pids()
    records = [r for r in caplog.records if r.name == "procession.tests.worker"]
    assert sorted(r.getMessage() for r in records) == [f"warned about {x}" for x in range(4)]
    assert all(getattr(r, "procession_worker", None) in pids for r in records)


def test_max_tasks_per_worker_replaces_workers() -> None:
    with procession.create_backend("process", workers=1, max_tasks_per_worker=2) as backend:
        pids = list(procession.map(worker_pid, range(6), backend=backend, chunksize=1))
    assert len(set(pids)) == 3
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5]


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_start_methods(start_method: str) -> None:
    with procession.create_backend("process", workers=2, start_method=start_method) as backend:
        assert list(procession.map(abs, [-1, -2, 3], backend=backend)) == [1, 2, 3]


def test_unknown_start_method_is_rejected() -> None:
    with pytest.raises(ValueError, match="start_method='teleport' is not available"):
        procession.create_backend("process", start_method="teleport")


def test_script_needs_no_main_guard(tmp_path: Path) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            """
            import procession
            print("top level ran")
            OFFSET = 3
            def shift(x):
                return x + OFFSET
            print(list(procession.map(shift, range(4), backend="process", workers=2)))
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    # The top level ran once, in the parent: workers never re-run __main__.
    assert done.stdout.count("top level ran") == 1
    assert "[3, 4, 5, 6]" in done.stdout


@pytest.mark.timeout(120)
def test_memory_stays_flat_over_ten_million_items() -> None:
    me = psutil.Process()
    results = procession.map(abs, range(10_000_000), backend="process")
    total = 0
    baseline = None
    peak = 0
    for count, value in enumerate(results):
        total += value
        if count == 500_000:
            baseline = me.memory_info().rss
        elif count % 1_000_000 == 0 and baseline is not None:
            peak = max(peak, me.memory_info().rss - baseline)
    assert total == sum(range(10_000_000))
    assert peak < 64 * 2**20, f"parent memory grew by {peak / 2**20:.0f} MiB"
