"""Real faults with real signals, on every built-in backend that kills and detects crashes.

Each test runs against ``process``, ``loky`` and ``multiprocessing`` alike:
workers killed by SIGKILL, ``os._exit``, segfaults, hangs past ``timeout=``,
crashes then retries, exceptions that do not travel, initializers that raise,
pools stopped while a task hangs, Ctrl-C and SIGKILL of the parent.  Tests
that only need a pool use the warm shared pools ``procession.map`` keeps
(``workers=2``), which is also how users meet these faults.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from _faults_helpers import (
    CTRL_C_SCRIPT,
    HANG_THEN_DIE_SCRIPT,
    NORMAL_EXIT_SCRIPT,
    act,
    init_raises,
)

import procession
from procession import api
from procession.errors import (
    RemoteError,
    SerializationError,
    TaskTimeoutError,
    WorkerCrashedError,
)

# The built-in local process pools that promise kill + crash detection.  Remote
# backends (dask, ray) are left out: their workers are not this process's
# children, so parent death, Ctrl-C and process-group checks mean something else
# there, and their own suites cover their faults.
FAULT_BACKENDS = sorted(
    name
    for name, info in procession.available_backends().items()
    if info.usable
    and info.origin == "built-in"
    and info.capabilities is not None
    and info.capabilities.kill
    and info.capabilities.crash_detection
    and not info.capabilities.remote
)

WORKERS = 2
# loky cannot lose a single worker: the tasks running beside a crash are re-run
# (documented in procession.backends.loky).  Their results still come once.
RERUNS_BYSTANDERS = {"loky"}


@pytest.fixture(params=FAULT_BACKENDS)
def fault_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def pmap(fault_backend: str, items: list[Any], **options: Any) -> list[Any]:
    """Map ``act`` over ``items`` on the warm shared pool, item by item."""
    options.setdefault("chunksize", 1)
    return list(procession.map(act, items, backend=fault_backend, workers=WORKERS, **options))


def shared(fault_backend: str) -> procession.Backend:
    return api.resolve_backend(fault_backend, WORKERS)


def assert_usable(fault_backend: str) -> None:
    assert pmap(fault_backend, [("ok", i) for i in range(6)], chunksize="auto") == list(range(6))


def wait_until(predicate: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def group_members(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` (zombies waiting for init excluded)."""
    members = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


# -- crashes ------------------------------------------------------------------------

CRASHES = {
    "sigkill": (("kill", 0.1), -signal.SIGKILL, "SIGKILL"),
    "os._exit": (("exit", 7, 0.1), 7, "code 7"),
    "segfault": (("segv", 0.1), -signal.SIGSEGV, "SIGSEGV"),
}


@pytest.mark.timeout(40)
@pytest.mark.parametrize("crash", list(CRASHES))
def test_crash_fails_only_its_item(fault_backend: str, crash: str, tmp_path: Path) -> None:
    fault, exitcode, words = CRASHES[crash]
    runs = tmp_path / "runs"
    items: list[Any] = [("record", str(runs), i, 0.3) for i in range(6)]
    items[3] = fault
    results = pmap(fault_backend, items, on_error="return")

    assert len(results) == 6
    error = results[3]
    assert isinstance(error, WorkerCrashedError), error
    assert error.exitcode == exitcode
    assert words in str(error)
    assert error.items == (3,)
    assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4, 5]
    counts = Counter(int(line) for line in runs.read_text().split())
    assert set(counts) == {0, 1, 2, 4, 5}  # none lost
    if fault_backend not in RERUNS_BYSTANDERS:
        assert all(n == 1 for n in counts.values()), counts  # none run twice
    assert_usable(fault_backend)


@pytest.mark.timeout(40)
def test_crash_raises_by_default_and_is_not_retried(fault_backend: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    with pytest.raises(WorkerCrashedError, match="exited with code 5") as info:
        pmap(fault_backend, [("ok", 0), ("crash_once", str(marker), 1), ("ok", 2)])
    assert info.value.items == (1,)
    assert "retries=" in str(info.value)  # says how to re-run lost items
    assert marker.exists()
    assert_usable(fault_backend)


@pytest.mark.timeout(40)
def test_crash_once_then_succeed_with_retries(fault_backend: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    items = [("ok", 0), ("crash_once", str(marker), "second try"), ("ok", 2), ("ok", 3)]
    assert pmap(fault_backend, items, retries=1) == [0, "second try", 2, 3]
    assert marker.exists()


@pytest.mark.timeout(40)
def test_raised_errors_are_never_retried(fault_backend: str, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    items = [("record", str(runs), 0, 0), ("raise", "not a crash")]
    results = pmap(fault_backend, items, retries=3, on_error="return")
    assert results[0] == 0
    assert isinstance(results[1], ValueError)
    assert str(results[1]) == "not a crash"


@pytest.mark.timeout(40)
def test_hang_past_timeout(fault_backend: str) -> None:
    items = [("sleep", 0.05, 0), ("hang",), ("sleep", 0.05, 2), ("sleep", 0.05, 3)]
    started = time.monotonic()
    results = pmap(fault_backend, items, timeout=1.0, on_error="return")
    assert time.monotonic() - started < 20
    assert results[0] == 0
    assert results[2:] == [2, 3]
    assert isinstance(results[1], TaskTimeoutError)
    assert results[1].index == 1

    with pytest.raises(TaskTimeoutError):
        pmap(fault_backend, [("ok", 0), ("hang",)], timeout=0.5)
    assert_usable(fault_backend)


@pytest.mark.timeout(40)
def test_worker_killed_while_idle(fault_backend: str) -> None:
    assert_usable(fault_backend)
    pool = shared(fault_backend)
    before = pool.worker_pids()
    assert before
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: gone(victim), 5)
    time.sleep(0.2)
    assert_usable(fault_backend)
    pids = pmap(fault_backend, [("pid", 0.1) for _ in range(4)])
    assert victim not in pids


@pytest.mark.timeout(40)
def test_abandoned_iterator_stops_reading_and_cancels(fault_backend: str) -> None:
    assert_usable(fault_backend)
    read = []

    def endless() -> Iterator[tuple[str, float, int]]:
        n = 0
        while True:
            read.append(n)
            yield ("sleep", 0.05, n)
            n += 1

    results = procession.map(act, endless(), backend=fault_backend, workers=WORKERS, chunksize=1)
    assert [next(results), next(results)] == [0, 1]
    results.close()
    consumed = len(read)
    assert consumed < 50  # only a bounded window was ever read
    time.sleep(0.3)
    assert len(read) == consumed  # and reading stopped with the consumer
    assert_usable(fault_backend)


# -- errors that must not break anything ---------------------------------------------


@pytest.mark.timeout(40)
def test_generator_input_raising_midway(fault_backend: str) -> None:
    def source() -> Iterator[tuple[str, int]]:
        yield ("ok", 1)
        yield ("ok", 2)
        raise LookupError("the input broke")

    results = procession.map(act, source(), backend=fault_backend, workers=WORKERS)
    assert [next(results), next(results)] == [1, 2]
    with pytest.raises(LookupError, match="the input broke"):
        next(results)
    assert_usable(fault_backend)


@pytest.mark.timeout(40)
def test_exceptions_that_cannot_travel(fault_backend: str) -> None:
    assert_usable(fault_backend)
    pids = shared(fault_backend).worker_pids()
    results = pmap(
        fault_backend,
        [("raise_unpicklable", "held a lock"), ("raise_unloadable", "first"), ("ok", 3)],
        on_error="return",
    )
    unpicklable, unloadable, ok = results
    assert ok == 3
    assert isinstance(unpicklable, RemoteError)
    assert unpicklable.type_name.endswith("UnpicklableError")
    assert unpicklable.remote_message == "held a lock"
    assert "raise UnpicklableError" in unpicklable.traceback_text
    assert isinstance(unloadable, RemoteError)
    assert unloadable.type_name.endswith("UnloadableError")
    assert unloadable.remote_message == "first/second"
    assert "raise UnloadableError" in unloadable.traceback_text
    # The workers survived: nothing crashed, nothing was replaced.
    assert shared(fault_backend).worker_pids() == pids


@pytest.mark.timeout(40)
def test_unpicklable_argument_and_result(fault_backend: str) -> None:
    results = pmap(
        fault_backend, [("ok", 0), ("ok", threading.Lock()), ("return_lock",)], on_error="return"
    )
    assert results[0] == 0
    assert isinstance(results[1], SerializationError)
    assert results[1].index == 1
    assert isinstance(results[2], SerializationError)
    assert results[2].index == 2
    assert_usable(fault_backend)


@pytest.mark.timeout(40)
def test_system_exit_is_the_tasks_error(fault_backend: str) -> None:
    assert_usable(fault_backend)
    pids = shared(fault_backend).worker_pids()
    results = pmap(fault_backend, [("ok", 0), ("sysexit", 3), ("ok", 2)], on_error="return")
    assert results[0] == 0
    assert results[2] == 2
    assert isinstance(results[1], SystemExit)
    assert results[1].code == 3
    assert shared(fault_backend).worker_pids() == pids


def _my_children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def assert_no_respawning() -> None:
    """Over a second and a half, no new child process appears (none is respawned)."""
    time.sleep(0.5)
    first = _my_children()
    seen = set(first)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        seen |= _my_children()
        time.sleep(0.02)
    assert seen == first, f"new processes kept appearing: {sorted(seen - first)}"


@pytest.mark.timeout(40)
def test_initializer_raising(fault_backend: str) -> None:
    ex = procession.Executor(
        backend=fault_backend, workers=1, initializer=init_raises, initargs=("init boom",)
    )
    try:
        future = ex.submit(abs, -1)
        with pytest.raises(WorkerCrashedError, match="init boom") as info:
            future.result(timeout=30)
        assert "init_raises" in str(info.value.__cause__)  # the worker's traceback
        assert_no_respawning()
        with pytest.raises(WorkerCrashedError, match="init boom"):
            ex.submit(abs, -2).result(timeout=10)
    finally:
        ex.kill_workers()


@pytest.mark.timeout(40)
def test_initializer_that_kills_the_worker(fault_backend: str) -> None:
    """Workers that die while starting: a clear error, and no endless respawning."""
    ex = procession.Executor(backend=fault_backend, workers=1, initializer=os._exit, initargs=(3,))
    try:
        with pytest.raises(WorkerCrashedError, match="code 3"):
            ex.submit(abs, -1).result(timeout=30)
        assert_no_respawning()
        with pytest.raises(WorkerCrashedError):
            ex.submit(abs, -2).result(timeout=10)
    finally:
        ex.kill_workers()


# -- stopping a pool that hangs --------------------------------------------------------


@pytest.mark.timeout(40)
@pytest.mark.parametrize("stop", ["terminate_workers", "kill_workers"])
def test_executor_stops_with_a_hung_task(fault_backend: str, stop: str) -> None:
    ex = procession.Executor(backend=fault_backend, workers=1)
    hung = ex.submit(act, ("hang",))
    assert wait_until(hung.running, 20)  # a worker picked the task up
    workers = ex.backend.worker_pids()
    queued = ex.submit(abs, -1)

    started = time.monotonic()
    ex.shutdown(wait=False, cancel_futures=True)
    assert time.monotonic() - started < 1.0
    assert queued.cancelled()
    # As in concurrent.futures, the running future is left alone.
    assert hung.running()

    started = time.monotonic()
    getattr(ex, stop)()
    assert isinstance(hung.exception(timeout=5), WorkerCrashedError)
    assert wait_until(lambda: all(gone(pid) for pid in workers), 5 - (time.monotonic() - started))


@pytest.mark.timeout(30)
def test_backend_kill_shutdown_returns_at_once(fault_backend: str) -> None:
    backend = procession.create_backend(fault_backend, workers=2)
    results = procession.map(act, [("hang",), ("hang",)], backend=backend, chunksize=1)
    outcome: list[BaseException] = []

    def consume() -> None:
        try:
            list(results)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    assert wait_until(lambda: len(backend.worker_pids()) == 2, 20)
    time.sleep(0.3)
    workers = backend.worker_pids()
    started = time.monotonic()
    backend.shutdown(wait=False, kill=True)
    assert time.monotonic() - started < 5
    thread.join(5)
    assert not thread.is_alive()  # the map got its error instead of hanging
    assert len(outcome) == 1
    assert isinstance(outcome[0], WorkerCrashedError)
    assert wait_until(lambda: all(gone(pid) for pid in workers), 5)


# -- the parent's fate ------------------------------------------------------------------


def _start_script(tmp_path: Path, script: str, fault_backend: str) -> subprocess.Popen[str]:
    path = tmp_path / "child.py"
    path.write_text(script)
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(path), fault_backend],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell would give it
        env=env,
        cwd=tmp_path,
    )


def _first_line(proc: subprocess.Popen[str], seconds: float = 30) -> str:
    """The child's first stdout line (read in a thread so a stuck child cannot hang us)."""
    assert proc.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(seconds)
    if not lines or not lines[0]:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"the child script never got going; its stderr:\n{err}")
    return lines[0].strip()


def _stop(proc: subprocess.Popen[str]) -> None:
    """Kill the child script and anything left in its process group; close its pipes."""
    proc.kill()
    for pid in group_members(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate(timeout=10)


@pytest.mark.timeout(60)
def test_ctrl_c_stops_the_map(fault_backend: str, tmp_path: Path) -> None:
    proc = _start_script(tmp_path, CTRL_C_SCRIPT, fault_backend)
    try:
        assert _first_line(proc) == "ready"
        time.sleep(0.2)
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        _, err = proc.communicate(timeout=15)
        assert time.monotonic() - started < 10
        assert "KeyboardInterrupt" in err
        assert proc.returncode != 0
        assert wait_until(lambda: not group_members(proc.pid), 5), group_members(proc.pid)
    finally:
        _stop(proc)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_parent_killed_leaves_no_worker(fault_backend: str, how: int, tmp_path: Path) -> None:
    proc = _start_script(tmp_path, HANG_THEN_DIE_SCRIPT, fault_backend)
    try:
        workers = [int(pid) for pid in _first_line(proc).split()]
        assert len(workers) == 2
        assert not any(gone(pid) for pid in workers)
        proc.send_signal(how)  # Python has no SIGTERM handler: no clean-up code runs
        proc.wait(10)
        assert proc.returncode == -how
        assert wait_until(lambda: all(gone(pid) for pid in workers), 5), [
            pid for pid in workers if not gone(pid)
        ]
        assert wait_until(lambda: not group_members(proc.pid), 5), group_members(proc.pid)
    finally:
        _stop(proc)


@pytest.mark.timeout(60)
def test_normal_exit_leaves_no_process(fault_backend: str, tmp_path: Path) -> None:
    proc = _start_script(tmp_path, NORMAL_EXIT_SCRIPT, fault_backend)
    try:
        workers = [int(pid) for pid in _first_line(proc).split()]
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert wait_until(lambda: all(gone(pid) for pid in workers), 5)
        assert wait_until(lambda: not group_members(proc.pid), 5), group_members(proc.pid)
    finally:
        _stop(proc)


# -- nothing accumulates ------------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"))


ROUND_FAULTS: list[Any] = [
    ("kill",),
    ("exit", 3),
    ("hang",),
    ("segv",),
    ("raise", "plain error"),
]


@pytest.mark.timeout(90)
def test_twenty_rounds_of_faults_leave_nothing_behind(fault_backend: str) -> None:
    # Warm the process-wide helpers (fork server, resource tracker) first.
    with procession.create_backend(fault_backend, workers=WORKERS) as warm:
        assert list(procession.map(abs, [-1], backend=warm)) == [1]
    threads, fds, children = threading.active_count(), _open_fds(), _my_children()

    backend = procession.create_backend(fault_backend, workers=WORKERS)
    for round_ in range(20):
        fault = ROUND_FAULTS[round_ % len(ROUND_FAULTS)]
        results = list(
            procession.map(
                act,
                [("ok", round_), fault, ("ok", -round_)],
                backend=backend,
                timeout=0.5,
                on_error="return",
            )
        )
        assert results[0] == round_
        assert results[2] == -round_
        assert isinstance(results[1], WorkerCrashedError | TaskTimeoutError | ValueError)
    backend.shutdown(wait=True)

    assert wait_until(lambda: threading.active_count() <= threads, 5), threading.enumerate()
    assert wait_until(lambda: _open_fds() <= fds, 5), (_open_fds(), fds)
    assert wait_until(lambda: _my_children() <= children, 5)


# -- fault injection: random SIGKILLs during a long map --------------------------------

INJECTION_ITEMS = 100_000
INJECTION_KILLS = 4


def _kill_workers_at_random(
    backend: procession.Backend, stop: threading.Event, killed: list[int], seed: int
) -> None:
    import random

    rng = random.Random(seed)
    while not stop.wait(rng.uniform(0.2, 0.6)) and len(killed) < INJECTION_KILLS:
        # Workers past start-up, as in production: a pool whose fresh workers die
        # before they finish starting is a broken environment, not a crash to heal.
        now = time.time()
        pids = []
        for pid in sorted(backend.worker_pids()):
            try:
                if now - psutil.Process(pid).create_time() > 1.5:
                    pids.append(pid)
            except psutil.Error:
                continue
        if not pids:
            continue
        pid = rng.choice(pids)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        killed.append(pid)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
def test_random_worker_kills_during_a_long_map(crash_backend_name: str, ordered: bool) -> None:
    """Every item exactly once, however many workers die under the map (retries=)."""
    from _faults_helpers import busy_identity

    backend = procession.create_backend(crash_backend_name, workers=WORKERS)
    stop, killed = threading.Event(), []
    try:
        backend.start()
        killer = threading.Thread(
            target=_kill_workers_at_random, args=(backend, stop, killed, 17), daemon=True
        )
        killer.start()
        results = list(
            procession.map(
                busy_identity,
                range(INJECTION_ITEMS),
                backend=backend,
                ordered=ordered,
                retries=3,
            )
        )
        stop.set()
        killer.join(5)
    finally:
        stop.set()
        backend.shutdown(kill=True)
    if ordered:
        assert results == list(range(INJECTION_ITEMS))
    else:
        counts = Counter(results)
        assert len(results) == INJECTION_ITEMS
        assert set(counts) == set(range(INJECTION_ITEMS))
        assert max(counts.values()) == 1
    # The map ran long enough for the killer to strike (else the test proves nothing).
    assert killed, "no worker was killed during the map"
