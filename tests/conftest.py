"""Shared fixtures: the backend parametrisation, leak checks, hypothesis profiles."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import psutil
import pytest
from hypothesis import HealthCheck, settings

import procession
from procession import pools

settings.register_profile(
    "ci",
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
    print_blob=True,
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Backends that the shared suite exercises; each proves the same behaviour.
# Built-ins plus the in-tree example plug-in (an entry-point backend).  The
# plug-in distributions under adapters/ (Ray) run the conformance suite in
# their own tests, so the heavy ones do not multiply this suite's run time.
_INFOS = procession.available_backends()
_SUITE_ORIGINS = ("built-in", "distribution procession-example-backend")
USABLE_BACKENDS = sorted(
    name for name, info in _INFOS.items() if info.usable and info.origin in _SUITE_ORIGINS
)
PROCESS_BACKENDS = sorted(
    name
    for name in USABLE_BACKENDS
    if (caps := _INFOS[name].capabilities) is not None and caps.isolated
)
CRASH_BACKENDS = sorted(
    name
    for name in USABLE_BACKENDS
    if (caps := _INFOS[name].capabilities) is not None and caps.crash_detection and caps.kill
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend_name" in metafunc.fixturenames:
        metafunc.parametrize("backend_name", USABLE_BACKENDS)
    if "process_backend_name" in metafunc.fixturenames:
        metafunc.parametrize("process_backend_name", PROCESS_BACKENDS)
    if "crash_backend_name" in metafunc.fixturenames:
        metafunc.parametrize("crash_backend_name", CRASH_BACKENDS)


def _shared_pool_pids() -> set[int]:
    """Workers of the warm pools procession.map keeps between calls (and their helpers)."""
    pids: set[int] = set()
    for backend in pools.shared_backends():
        pids |= backend.worker_pids()
    for pid in list(pids):
        try:
            pids |= {p.pid for p in psutil.Process(pid).children(recursive=True)}
        except psutil.Error:
            pass
    return pids


def _is_singleton_helper(proc: psutil.Process) -> bool:
    """multiprocessing's forkserver and resource tracker live for the whole session."""
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return True
    return (
        "forkserver" in cmdline or "resource_tracker" in cmdline or "semaphore_tracker" in cmdline
    )


def _descendants() -> dict[int, psutil.Process]:
    return {p.pid: p for p in psutil.Process().children(recursive=True)}


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fail a test that leaves child processes behind (warm shared pools excepted)."""
    before = set(_descendants())
    yield
    deadline = time.monotonic() + 10.0
    while True:
        allowed = before | _shared_pool_pids()
        extra = {
            pid: proc
            for pid, proc in _descendants().items()
            if pid not in allowed
            and not _is_singleton_helper(proc)
            and proc.is_running()
            and proc.status() != psutil.STATUS_ZOMBIE
        }
        if not extra or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if extra:
        described = []
        for pid, proc in extra.items():
            try:
                described.append(f"{pid}: {' '.join(proc.cmdline())[:120]}")
            except psutil.Error:
                described.append(str(pid))
        pytest.fail("test left child processes behind: " + "; ".join(described))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    pools.shutdown_shared_pools(kill=True)
