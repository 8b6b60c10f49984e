"""One local Ray instance for the whole test session, and a check that none survives it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import procession
from procession import pools

RAY_TEST_TIMEOUT = 180


def _ray_processes() -> set[int]:
    """Descendants of this process that Ray started (its daemons and workers)."""
    from procession_ray import _descendants

    found = set()
    for pid in _descendants({os.getpid()}) - {os.getpid()}:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                text = cmdline.read()
        except OSError:
            continue
        if b"ray" in text:
            found.add(pid)
    return found


@pytest.fixture(scope="session", autouse=True)
def ray_session() -> Iterator[None]:
    """Start the shared "ray" backend once; at the end stop it and check nothing is left."""
    before = _ray_processes()
    list(procession.map(abs, [-1], backend="ray"))  # starts the local instance
    yield
    for backend in pools.shared_backends():
        if backend.name == "ray":
            pools.forget_shared_pool(backend, kill=True)
    left = _ray_processes() - before
    assert not left, f"Ray processes left running after shutdown: {sorted(left)}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The first Ray test also pays for starting Ray (seconds alone, much more on
    # a loaded machine): give these tests a bound that still catches a hang.
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.timeout(RAY_TEST_TIMEOUT))
