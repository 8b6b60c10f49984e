"""Warm shared pools: the backends that :func:`procession.map` keeps between calls.

One pool per (backend name, worker count), started on first use and reused
by every later ``map`` with the same pair; stopped at interpreter exit.  A
forked child never reuses its parent's pool objects (their pipes and threads
belong to the parent): :func:`os.register_at_fork` empties the table there.

Example::

    backend = procession.pools.shared_backend("process", workers=2)
    procession.pools.shutdown_shared_pools()   # the next map starts a fresh one
"""

from __future__ import annotations

import atexit
import os
import threading

from procession.backends.base import Backend
from procession.backends.registry import create_backend

__all__ = ["forget_shared_pool", "shared_backend", "shared_backends", "shutdown_shared_pools"]

_lock = threading.Lock()
_pools: dict[tuple[str, int | None], Backend] = {}


def shared_backend(name: str, workers: int | None = None) -> Backend:
    """The warm pool for ``name`` and ``workers``, created on first use."""
    key = (name, workers)
    with _lock:
        found = _pools.get(key)
        if found is None:
            found = create_backend(name, workers=workers)
            _pools[key] = found
        return found


def shared_backends() -> list[Backend]:
    """Every warm pool held now (for leak checks and diagnostics)."""
    with _lock:
        return list(_pools.values())


def forget_shared_pool(backend: Backend, *, kill: bool = True) -> None:
    """Drop ``backend`` from the table and stop it (the next map starts a fresh one)."""
    with _lock:
        for key, value in list(_pools.items()):
            if value is backend:
                del _pools[key]
    backend.shutdown(wait=not kill, kill=kill)


def shutdown_shared_pools(*, kill: bool = False) -> None:
    """Stop every warm pool that :func:`procession.map` started (they restart on next use)."""
    with _lock:
        backends = list(_pools.values())
        _pools.clear()
    for backend in backends:
        backend.shutdown(wait=not kill, kill=kill)


def _reset_after_fork() -> None:
    # The parent's pools (threads, pipes, locks) are not ours to use or stop.
    global _lock
    _lock = threading.Lock()
    _pools.clear()


os.register_at_fork(after_in_child=_reset_after_fork)
atexit.register(shutdown_shared_pools, kill=True)
