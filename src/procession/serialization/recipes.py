"""Recipes: picklable descriptions of objects that are rebuilt in the worker.

A :class:`Recipe` travels as "call this factory with these arguments"; on the
other side it is built once per process, cached, and every later task (and
every later ``map`` on that pool) gets the same built object.  Two equal
recipes (same factory, same arguments) share one built object.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["Recipe", "build_count", "built_recipes_clear"]

T = TypeVar("T")


class Recipe(Generic[T]):
    """How to build an object, instead of the object itself.

    Wherever a Recipe appears inside a task (an argument, a
    ``functools.partial``, an attribute), the function receives the built object.

    Example::

        db = procession.Recipe(sqlite3.connect, "data.db")
        procession.map(lambda key, conn=db: conn.execute(...), keys)
    """

    __slots__ = ("_key", "args", "factory", "kwargs")

    def __init__(self, factory: Callable[..., T], /, *args: Any, **kwargs: Any) -> None:
        if not callable(factory):
            raise TypeError(
                f"Recipe() needs a callable factory first, got {type(factory).__name__}: "
                f"write procession.Recipe(factory, *args, **kwargs)"
            )
        self.factory = factory
        self.args = args
        self.kwargs = kwargs
        self._key: bytes | None = None

    def build(self) -> T:
        """Build the object here and now (uncached)."""
        return self.factory(*self.args, **self.kwargs)

    @property
    def key(self) -> bytes:
        """The recipe's identity: a digest of its factory and arguments."""
        if self._key is None:
            import cloudpickle

            # Ordering kwargs makes Recipe(f, a=1, b=2) equal Recipe(f, b=2, a=1).
            payload = cloudpickle.dumps(
                (self.factory, self.args, sorted(self.kwargs.items())), protocol=5
            )
            self._key = hashlib.blake2b(payload, digest_size=16).digest()
        return self._key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        name = getattr(self.factory, "__qualname__", repr(self.factory))
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"Recipe({name}, {', '.join(parts)})" if parts else f"Recipe({name})"

    def __reduce__(self) -> tuple[Any, ...]:
        from procession.serialization import _rebuild

        return (_rebuild.build_recipe, (self.key, self.factory, self.args, self.kwargs))


# The per-process cache of built recipes.  A lock per key makes sure that two
# threads asking for the same recipe build it once, while different recipes
# build concurrently.
_cache: dict[bytes, Any] = {}
_cache_lock = threading.Lock()
_key_locks: dict[bytes, threading.Lock] = {}
_build_counts: dict[bytes, int] = {}


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
        _build_counts[key] = _build_counts.get(key, 0) + 1
        return built


def build_count(recipe: Recipe[Any]) -> int:
    """How many times ``recipe`` was built in this process (0 or 1 unless cleared)."""
    return _build_counts.get(recipe.key, 0)


def built_recipes_clear() -> None:
    """Forget every built recipe in this process (they are rebuilt on next use)."""
    with _cache_lock:
        _cache.clear()
        _key_locks.clear()
