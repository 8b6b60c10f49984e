"""The adapter registry: unpicklable types turned into Recipes.

``register_adapter(type_, reduce)`` says "an object of this type travels as
``reduce(obj)``", where ``reduce`` returns a :class:`~procession.Recipe`.
Lookups follow the MRO, so an adapter for a base class covers subclasses.
Third-party adapters come from the entry-point group ``procession.adapters``,
read on first lookup, not at import.  A reducer that cannot send an object
raises :class:`~procession.SerializationError` with advice; the diagnostics
put that advice in front of the user together with the object's path.

The built-in adapters (:mod:`procession.serialization.builtin_adapters`) may
be replaced: a user's ``register_adapter`` for the same type wins over them.
Some built-ins are registered by type *name* (``"multiprocessing.synchronize.Lock"``)
so that looking them up never imports the module that defines the type.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from procession.serialization.recipes import Recipe

__all__ = [
    "find_reducer",
    "reduce_with",
    "register_adapter",
    "register_builtin_adapter",
    "registered_adapters",
]

Reducer = Callable[[Any], Recipe[Any]]

_lock = threading.RLock()
_adapters: dict[type, Reducer] = {}
# Adapters keyed by "module.QualName", and the built-ins (by type or name)
# that a user registration may replace.
_adapters_by_name: dict[str, Reducer] = {}
_builtins: set[type | str] = set()
# type -> reducer or None; rebuilt whenever the registry changes.
_lookup_cache: dict[type, Reducer | None] = {}
_entry_points_loaded = False


def register_adapter(type_: type | str, reduce: Reducer) -> None:
    """Send objects of ``type_`` as the Recipe ``reduce(obj)`` returns.

    Example::

        procession.register_adapter(
            MyHandle, lambda h: procession.Recipe(MyHandle.open, h.path)
        )

    ``type_`` may also be the type's ``"module.QualName"`` (as in
    ``f"{cls.__module__}.{cls.__qualname__}"``): a plug-in can then register
    without importing the library that defines the type.  Registering the same
    reducer twice is harmless; a different one for a type that already has an
    adapter is an error (a built-in adapter is replaced instead).  To refuse
    objects with advice, raise :class:`~procession.SerializationError` from
    ``reduce``.
    """
    if isinstance(type_, str):
        if "." not in type_:
            raise ValueError(
                f"register_adapter() needs a type or its 'module.QualName', got {type_!r}"
            )
        label = type_
    elif isinstance(type_, type):
        label = f"{type_.__module__}.{type_.__qualname__}"
    else:
        raise TypeError(
            f"register_adapter() needs a type (or 'module.QualName') first, "
            f"got {type(type_).__name__}"
        )
    if not callable(reduce):
        raise TypeError(f"register_adapter({label}, ...) needs a callable reduce(obj) -> Recipe")
    with _lock:
        table: dict[Any, Reducer] = _adapters_by_name if isinstance(type_, str) else _adapters
        existing = table.get(type_)
        if existing is not None and type_ in _builtins:
            _builtins.discard(type_)
        elif existing is not None and existing is not reduce:
            raise ValueError(f"an adapter for {label} is already registered ({existing!r})")
        table[type_] = reduce
        _lookup_cache.clear()


def register_builtin_adapter(type_: type | str, reduce: Reducer) -> None:
    """Register one of procession's own adapters (a user's adapter replaces it).

    ``type_`` may be a ``"module.QualName"`` string, matched against the MRO
    of the objects being sent without importing that module.
    """
    with _lock:
        table: dict[Any, Reducer] = _adapters_by_name if isinstance(type_, str) else _adapters
        if type_ not in table:
            table[type_] = reduce
            _builtins.add(type_)
        _lookup_cache.clear()


def registered_adapters() -> dict[type, Reducer]:
    """A copy of the registry (built-ins, entry points and user adapters).

    Built-ins registered by name appear once their type has been imported.
    """
    _ensure_loaded()
    with _lock:
        found = dict(_adapters)
        if _adapters_by_name:
            import sys

            for name, reduce in _adapters_by_name.items():
                module, _, qualname = name.rpartition(".")
                cls = getattr(sys.modules.get(module), qualname, None)
                if isinstance(cls, type):
                    found.setdefault(cls, reduce)
        return found


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
            if _adapters_by_name:
                by_name = _adapters_by_name.get(f"{base.__module__}.{base.__qualname__}")
                if by_name is not None:
                    found = by_name
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
