"""Recipes: picklable descriptions of objects that are rebuilt in the worker.

A :class:`Recipe` travels as "call this factory with these arguments"; on the
other side it is built once per process, cached, and every later task (and
every later ``map`` on that pool) gets the same built object.  Two equal
recipes (same factory, same arguments) share one built object.

Three scopes say how widely a built object is shared on the far side:

``"process"`` (the default)
    built once per process; every thread of that process shares it.
``"thread"``
    built once per thread (for objects that must stay on the thread that made
    them, such as a ``sqlite3.Connection``): on the ``threads`` backend each
    pool thread gets its own; on a process backend this is once per worker.
``"fresh"``
    built anew every time it is unpickled, never cached (a generator, a file
    position: state that one task must not leak into the next).  Such a
    Recipe is a *value with state*, not a resource: serializing one is
    counted by :func:`~procession.serialization.track_stateful_values`, so
    that bytes holding it are unpickled once per use.

The caches themselves live in the leaf module ``_cache``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar

from procession.serialization import _cache, _rebuild
from procession.serialization._tracking import note_stateful_value

__all__ = ["Recipe", "Scope", "build_count", "built_recipes_clear"]

T = TypeVar("T")
Scope = Literal["process", "thread", "fresh"]
_SCOPES: tuple[str, ...] = ("process", "thread", "fresh")


class Recipe(Generic[T]):
    """How to build an object, instead of the object itself.

    Wherever a Recipe appears inside a task (an argument, a
    ``functools.partial``, an attribute), the function receives the built object,
    built once per worker process and reused by every later task and ``map``.

    Example::

        db = procession.Recipe(sqlite3.connect, "data.db").per_thread()
        procession.map(functools.partial(lookup, conn=db), keys)
    """

    __slots__ = ("_key", "args", "factory", "kwargs", "scope")

    def __init__(self, factory: Callable[..., T], /, *args: Any, **kwargs: Any) -> None:
        if not callable(factory):
            raise TypeError(
                f"Recipe() needs a callable factory first, got {type(factory).__name__}: "
                f"write procession.Recipe(factory, *args, **kwargs)"
            )
        self.factory = factory
        self.args = args
        self.kwargs = kwargs
        self.scope: Scope = "process"
        self._key: bytes | None = None

    def build(self) -> T:
        """Build the object here and now (uncached)."""
        return self.factory(*self.args, **self.kwargs)

    def with_scope(self, scope: Scope) -> Recipe[T]:
        """A copy of this recipe with another scope (``"process"``, ``"thread"``, ``"fresh"``).

        Example::

            fresh = procession.Recipe(open, "words.txt").with_scope("fresh")
        """
        if scope not in _SCOPES:
            raise ValueError(f"scope must be one of {', '.join(map(repr, _SCOPES))}, got {scope!r}")
        copy: Recipe[T] = Recipe(self.factory, *self.args, **self.kwargs)
        copy.scope = scope
        return copy

    def per_thread(self) -> Recipe[T]:
        """A copy built once per worker thread instead of once per process."""
        return self.with_scope("thread")

    def fresh(self) -> Recipe[T]:
        """A copy built anew each time it arrives (never cached)."""
        return self.with_scope("fresh")

    @property
    def key(self) -> bytes:
        """The recipe's identity: a digest of its factory and arguments."""
        if self._key is None:
            # The adapting serializer, so a Recipe may take adapted objects
            # (another Recipe, a connection) as arguments.
            from procession.serialization.serializers import get_serializer

            # Ordering kwargs makes Recipe(f, a=1, b=2) equal Recipe(f, b=2, a=1).
            payload = get_serializer("cloudpickle").dumps(
                (self.factory, self.args, sorted(self.kwargs.items()))
            )
            self._key = hashlib.blake2b(payload, digest_size=16).digest()
        return self._key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and self.scope == other.scope and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        name = getattr(self.factory, "__qualname__", repr(self.factory))
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        scope = "" if self.scope == "process" else f".with_scope({self.scope!r})"
        return f"Recipe({', '.join([name, *parts])}){scope}"

    def __reduce__(self) -> tuple[Any, ...]:
        if self.scope == "fresh":
            # A value with state: bytes holding it must be unpickled per use.
            note_stateful_value()
            return (_rebuild.call, (self.factory, self.args, self.kwargs))
        if self.scope == "thread":
            build = _rebuild.build_recipe_per_thread
        else:
            build = _rebuild.build_recipe
        return (build, (self.key, self.factory, self.args, self.kwargs))


def build_count(recipe: Recipe[Any]) -> int:
    """How many times ``recipe`` was built in this process (all threads together).

    Example::

        assert procession.serialization.build_count(recipe) <= 1
    """
    return _cache.build_count_of(recipe.key)


def built_recipes_clear() -> None:
    """Forget every built recipe in this process (they are rebuilt on next use).

    Only this thread's per-thread recipes are forgotten; other threads keep theirs.
    """
    _cache.clear()
