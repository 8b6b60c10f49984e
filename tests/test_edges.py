"""Trust at the edges (issue 17): nested maps, exit, cancellation, healing, Ctrl-C.

Every test here is parametrised over the backends it concerns; the random-kill
fault injection lives in tests/test_faults.py.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from _backend_helpers import workers_up_to
from _faults_helpers import (
    EXIT_DRAIN_SCRIPT,
    LEFTOVERS_SCRIPT,
    SUBMIT_AT_EXIT_SCRIPT,
    nested_default,
    nested_explicit,
    nested_threads,
    raise_keyboard_interrupt,
    start_grandchild,
)

import procession
from procession import _nesting, api
from procession.errors import RemoteTraceback

HERE = Path(__file__).parent


def _two(backend_name: str) -> int:
    """Two workers, or what the backend can run (serial: one)."""
    return workers_up_to(backend_name, 2)


# -- 3. nested maps -------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_nested_map_runs_inline_in_the_worker(backend_name: str) -> None:
    # On threads this deadlocked: both outer tasks waited on the pool they occupied.
    out = list(
        procession.map(nested_default, [3, 4], backend=backend_name, workers=_two(backend_name))
    )
    assert out == [(3, True, True), (4, True, True)]


@pytest.mark.timeout(90)
def test_nested_explicit_threads_get_their_own_pool(backend_name: str) -> None:
    out = list(
        procession.map(nested_threads, [3, 4, 5], backend=backend_name, workers=_two(backend_name))
    )
    assert out == [6, 10, 15]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("inner", ["process", "loky", "multiprocessing", "dask"])
def test_nested_process_pool_is_refused_with_advice(backend_name: str, inner: str) -> None:
    (message,) = procession.map(
        nested_explicit, [inner], backend=backend_name, workers=_two(backend_name)
    )
    assert f"backend={inner!r} was called inside a procession task" in message
    assert "Drop backend=" in message


def test_nesting_rule_outside_a_task() -> None:
    assert _nesting.nested_backend("process") is None
    assert _nesting.nesting_level() == 0


# -- 4. accepted work runs at interpreter exit ----------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["no-shutdown", "shutdown-nowait"])
def test_accepted_work_runs_at_exit(backend_name: str, mode: str, tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(EXIT_DRAIN_SCRIPT))
    log = tmp_path / "ran.txt"
    done = subprocess.run(
        [sys.executable, str(script), backend_name, mode, str(log)],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=HERE,
    )
    assert done.returncode == 0, done.stderr
    cancelled = int(done.stdout.split()[0])
    ran = log.read_text().split() if log.exists() else []
    # Each accepted task ran exactly once; each cancelled one never ran.
    assert sorted(ran, key=int) == sorted(set(ran), key=int)
    assert len(ran) == 20 - cancelled, (cancelled, ran, done.stderr[-2000:])
    assert {str(i) for i in range(10)} <= set(ran)


# -- 7. cancellation -----------------------------------------------------------------


@pytest.mark.timeout(90)
def test_cancel_before_start_and_shutdown_cancel_futures(backend_name: str) -> None:
    import time

    with procession.Executor(backend=backend_name, workers=_two(backend_name)) as ex:
        futures = [ex.submit(time.sleep, 0.2) for _ in range(30)]
        # In-process inline backends run each task inside submit(): nothing to cancel.
        inline = all(f.done() for f in futures)
        if not inline:
            assert futures[-1].cancel()
            assert futures[-1].cancelled()
        ex.shutdown(wait=True, cancel_futures=True)
    cancelled = [f for f in futures if f.cancelled()]
    finished = [f for f in futures if not f.cancelled()]
    if not inline:
        # Only a small bounded prefetch ever reaches the workers.
        assert len(cancelled) >= 20
    assert all(f.done() and f.exception() is None for f in finished)


# -- 10. KeyboardInterrupt raised by task code ----------------------------------------


@pytest.mark.timeout(90)
def test_keyboard_interrupt_in_a_task_is_the_tasks_error(backend_name: str) -> None:
    pool = api.resolve_backend(backend_name, _two(backend_name))
    pool.start()
    pids = pool.worker_pids()
    with pytest.raises(KeyboardInterrupt) as info:
        list(
            procession.map(
                raise_keyboard_interrupt,
                [1],
                backend=backend_name,
                workers=_two(backend_name),
            )
        )
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "raised by the task" in str(info.value.__cause__)
    # The shared pool survived: same pool object, same workers, still working.
    assert api.resolve_backend(backend_name, _two(backend_name)) is pool
    assert pool.worker_pids() == pids
    assert list(
        procession.map(abs, [-1, -2], backend=backend_name, workers=_two(backend_name))
    ) == [1, 2]

    with procession.Executor(backend=backend_name, workers=_two(backend_name)) as ex:
        with pytest.raises(KeyboardInterrupt):
            ex.submit(raise_keyboard_interrupt, 0).result(timeout=60)
        assert ex.submit(abs, -3).result(timeout=60) == 3
        with pytest.raises(KeyboardInterrupt):
            list(ex.map(raise_keyboard_interrupt, [0, 1]))
        assert list(ex.map(abs, [-4])) == [4]


# -- 11. leftovers ------------------------------------------------------------------

LOCAL_POOLS = ["loky", "multiprocessing", "process"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pool", LOCAL_POOLS)
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_parent_killed_leaves_no_temp_folder(pool: str, how: int, tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(LEFTOVERS_SCRIPT))
    proc = subprocess.Popen(
        [sys.executable, str(script), pool],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=HERE,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        folder = Path(proc.stdout.readline().strip())
        # pymp-* (fork server listener) or procession-loky-* (start log, output socket)
        assert folder.name.startswith(("pymp-", "procession-loky-")), folder
        assert folder.exists()
        proc.send_signal(how)
        proc.wait(10)
        assert _wait(lambda: not folder.exists(), 10), sorted(folder.iterdir())
        # loky's named semaphores are unlinked too (by loky's resource tracker).
        semaphores = f"/dev/shm/sem.loky-{proc.pid}-*"
        assert _wait(lambda: not glob.glob(semaphores), 10), glob.glob(semaphores)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pool", LOCAL_POOLS)
def test_children_of_tasks_die_with_the_pool(pool: str) -> None:
    backend = procession.create_backend(pool, workers=2)
    try:
        pids = list(procession.map(start_grandchild, range(2), backend=backend, chunksize=1))
        assert all(psutil.pid_exists(pid) for pid in pids)
    finally:
        backend.shutdown(wait=True)
    assert _wait(lambda: all(_gone(pid) for pid in pids), 10)


@pytest.mark.timeout(90)
def test_dask_leaves_no_scratch_space() -> None:
    backend = procession.create_backend("dask", workers=1)
    try:
        assert list(procession.map(abs, [-1, -2], backend=backend)) == [1, 2]
        scratch = backend._scratch
        assert scratch is not None and Path(scratch).exists()
        assert (Path(scratch) / "dask-scratch-space").exists()
    finally:
        backend.shutdown(wait=True)
    assert not Path(scratch).exists()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait(predicate: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# -- edges found by CPython's own executor tests (tools/run_cpython_futures_tests.py) --


@pytest.mark.timeout(90)
def test_submit_during_interpreter_exit_is_refused(backend_name: str, tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SUBMIT_AT_EXIT_SCRIPT))
    done = subprocess.run(
        [sys.executable, str(script), backend_name],
        capture_output=True,
        text=True,
        timeout=80,
        cwd=HERE,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == [
        "42",
        "refused: cannot schedule new futures after interpreter shutdown",
    ]
