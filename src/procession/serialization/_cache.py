"""The per-process caches of built Recipes (a leaf module).

A Recipe of scope ``"process"`` is built once per process and shared by its
threads; one of scope ``"thread"`` once per thread.  These are the caches
that make that so.  Only *resources* live here: a value with state
(``Recipe.fresh()``, a ``kind="value"`` adapter) is built on every unpickle
and never cached.

This module imports nothing from procession: ``_rebuild`` (whose names end up
inside pickles) depends on it and on nothing else.  A forked child starts with
empty caches: a connection or file handle built in the parent must not be
shared with it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["build_cached", "build_count_of", "build_thread_cached", "clear"]

_cache: dict[bytes, Any] = {}
# A lock per key makes sure that two threads asking for the same recipe build
# it once, while different recipes build concurrently.
_cache_lock = threading.Lock()
_key_locks: dict[bytes, threading.Lock] = {}
_build_counts: dict[bytes, int] = {}
# Per-thread recipes live in thread-local storage, so a pool thread's objects
# are released with the thread.
_thread_cache = threading.local()


def _count_build(key: bytes) -> None:
    with _cache_lock:
        _build_counts[key] = _build_counts.get(key, 0) + 1


def build_cached(key: bytes, factory: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """Return the object built from this recipe in this process, building it once."""
    try:
        return _cache[key]
    except KeyError:
        pass
    with _cache_lock:
        lock = _key_locks.setdefault(key, threading.Lock())
    with lock:
        if key in _cache:
            return _cache[key]
        built = factory(*args, **kwargs)
        _cache[key] = built
        _count_build(key)
        return built


def build_thread_cached(key: bytes, factory: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """Return the object built from this recipe in this thread, building it once."""
    cache: dict[bytes, Any] | None = getattr(_thread_cache, "objects", None)
    if cache is None:
        cache = _thread_cache.objects = {}
    try:
        return cache[key]
    except KeyError:
        pass
    built = factory(*args, **kwargs)
    cache[key] = built
    _count_build(key)
    return built


def build_count_of(key: bytes) -> int:
    """How many times the recipe with this key was built in this process."""
    with _cache_lock:
        return _build_counts.get(key, 0)


def clear() -> None:
    """Forget every built recipe in this process, and this thread's per-thread ones."""
    with _cache_lock:
        _cache.clear()
        _key_locks.clear()
        _build_counts.clear()
    _thread_cache.objects = {}


def _reset_after_fork() -> None:
    global _cache_lock
    # Another thread may have held the lock at fork time; the child has only
    # the forking thread, so start from fresh state rather than wait forever.
    _cache_lock = threading.Lock()
    _cache.clear()
    _key_locks.clear()
    _build_counts.clear()
    _thread_cache.objects = {}


os.register_at_fork(after_in_child=_reset_after_fork)
