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
import contextlib
import os
import threading
from concurrent import futures

from procession.backends.base import Backend
from procession.backends.registry import create_backend

__all__ = [
    "accept_work",
    "drain_accepted_work",
    "drain_first_at_exit",
    "forget_shared_pool",
    "interpreter_exiting",
    "shared_backend",
    "shared_backends",
    "shutdown_shared_pools",
]

_lock = threading.Lock()
_pools: dict[tuple[str, int | None, int], Backend] = {}


def shared_backend(name: str, workers: int | None = None, *, level: int = 0) -> Backend:
    """The warm pool for ``name`` and ``workers``, created on first use.

    ``level`` is the nesting level of the caller (0 outside any task): a map
    called inside a task gets a pool of its own, never the one its caller's
    task may be occupying (see :mod:`procession._nesting`).
    """
    key = (name, workers, level)
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


# -- accepted work runs to completion at interpreter exit -------------------------
#
# concurrent.futures' executors finish every task they accepted when the script
# ends (unless it was cancelled), whether or not shutdown() was called.  Our
# backends stop their workers from exit hooks (so that no worker outlives the
# parent), and those hooks must not run before that work is done: every such
# hook calls drain_accepted_work() first, and the drain is also registered as a
# threading exit hook, which runs before atexit handlers and before the
# thread pools of concurrent.futures stop taking work.

_accepted_lock = threading.Lock()
_accepted: set[futures.Future[object]] = set()
_drain_registrations: set[str] = set()
_exiting = False


def interpreter_exiting() -> bool:
    """True once the interpreter started to exit (Executors then refuse new work)."""
    return _exiting


def accept_work(future: futures.Future[object]) -> None:
    """Remember ``future`` (an Executor task) until it is done, so exit waits for it."""
    with _accepted_lock:
        _accepted.add(future)
    future.add_done_callback(_forget_work)


def _forget_work(future: futures.Future[object]) -> None:
    with _accepted_lock:
        _accepted.discard(future)


def drain_accepted_work() -> None:
    """Block until every accepted, uncancelled Executor task has finished.

    Called at interpreter exit before any backend stops its workers (stdlib
    semantics: ``shutdown(wait=False)`` or no shutdown at all still runs the
    work).  Cheap when nothing is pending.
    """
    global _exiting
    _exiting = True
    while True:
        with _accepted_lock:
            pending = [f for f in _accepted if not f.done()]
        if not pending:
            return
        futures.wait(pending)


def drain_first_at_exit(owner: str) -> None:
    """Register the drain as a threading exit hook after ``owner``'s libraries loaded.

    Exit hooks run last-registered first, so a backend calls this once its own
    libraries (whose hooks stop their thread pools and executors) are imported.
    """
    with _accepted_lock:
        if owner in _drain_registrations:
            return
        _drain_registrations.add(owner)
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        with contextlib.suppress(RuntimeError):  # already shutting down
            register(drain_accepted_work)


def _stop_shared_pools_at_exit() -> None:
    drain_accepted_work()
    shutdown_shared_pools(kill=True)


def _reset_after_fork() -> None:
    # The parent's pools (threads, pipes, locks) are not ours to use or stop.
    global _lock, _accepted_lock, _exiting
    _lock = threading.Lock()
    _exiting = False
    _pools.clear()
    _accepted_lock = threading.Lock()
    _accepted.clear()
    _drain_registrations.clear()


os.register_at_fork(after_in_child=_reset_after_fork)
atexit.register(_stop_shared_pools_at_exit)
drain_first_at_exit("procession")
