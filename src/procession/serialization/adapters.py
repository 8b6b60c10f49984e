"""The adapter registry: unpicklable types turned into Recipes.

``register_adapter(type_, reduce)`` says "an object of this type travels as
``reduce(obj)``", where ``reduce`` returns a :class:`~procession.Recipe`.
Lookups follow the MRO, so an adapter for a base class covers subclasses.
Third-party adapters come from the entry-point group ``procession.adapters``,
read on first lookup, not at import.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from procession.serialization.recipes import Recipe

__all__ = ["find_reducer", "reduce_with", "register_adapter", "registered_adapters"]

Reducer = Callable[[Any], Recipe[Any]]

_lock = threading.RLock()
_adapters: dict[type, Reducer] = {}
# type -> reducer or None; rebuilt whenever the registry changes.
_lookup_cache: dict[type, Reducer | None] = {}
_entry_points_loaded = False


def register_adapter(type_: type, reduce: Reducer) -> None:
    """Send objects of ``type_`` as the Recipe ``reduce(obj)`` returns.

    Example::

        procession.register_adapter(
            MyHandle, lambda h: procession.Recipe(MyHandle.open, h.path)
        )

    Registering the same reducer twice is harmless; a different one for a
    type that already has an adapter is an error.
    """
    if not isinstance(type_, type):
        raise TypeError(f"register_adapter() needs a type first, got {type(type_).__name__}")
    if not callable(reduce):
        raise TypeError(
            f"register_adapter({type_.__qualname__}, ...) needs a callable reduce(obj) -> Recipe"
        )
    with _lock:
        existing = _adapters.get(type_)
        if existing is not None and existing is not reduce:
            raise ValueError(
                f"an adapter for {type_.__module__}.{type_.__qualname__} is already "
                f"registered ({existing!r})"
            )
        _adapters[type_] = reduce
        _lookup_cache.clear()


def registered_adapters() -> dict[type, Reducer]:
    """A copy of the registry (built-ins, entry points and user adapters)."""
    _ensure_loaded()
    with _lock:
        return dict(_adapters)


def _ensure_loaded() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    with _lock:
        if _entry_points_loaded:
            return
        _entry_points_loaded = True
        from procession.serialization import builtin_adapters

        builtin_adapters.register_builtin_adapters()
        _load_entry_points()


def _load_entry_points() -> None:
    """Each entry point in ``procession.adapters`` names a callable that registers
    its adapters (``def register(): procession.register_adapter(...)``)."""
    import warnings
    from importlib.metadata import entry_points

    for ep in entry_points(group="procession.adapters"):
        dist = ep.dist.name if ep.dist is not None else "an unknown distribution"
        try:
            hook = ep.load()
            hook()
        except Exception as exc:
            warnings.warn(
                f"procession adapter plug-in {ep.name!r} from {dist} failed to load "
                f"({type(exc).__name__}: {exc}); its adapters are not available. "
                f"Reinstall or uninstall {dist}.",
                RuntimeWarning,
                stacklevel=2,
            )


def find_reducer(cls: type) -> Reducer | None:
    """The adapter for ``cls`` (searching its MRO), or None."""
    try:
        return _lookup_cache[cls]
    except KeyError:
        pass
    _ensure_loaded()
    with _lock:
        found: Reducer | None = None
        for base in cls.__mro__:
            if base in _adapters:
                found = _adapters[base]
                break
        _lookup_cache[cls] = found
        return found


def reduce_with(reduce: Reducer, obj: Any) -> tuple[Any, ...]:
    """Run an adapter and turn its Recipe into a pickle reduce tuple."""
    recipe = reduce(obj)
    if not isinstance(recipe, Recipe):
        raise TypeError(
            f"the adapter for {type(obj).__qualname__} returned {type(recipe).__name__}, "
            f"not a procession.Recipe"
        )
    return recipe.__reduce__()
