"""The adapter registry: unpicklable types turned into Recipes.

``register_adapter(type_, reduce, kind=...)`` says "an object of this type
travels as ``reduce(obj)``", where ``reduce`` returns a :class:`~procession.Recipe`,
and what kind of thing that Recipe stands for in the worker:

``"resource"`` (the default)
    a connection, a read-only handle, a client: built once per worker (the
    Recipe's scope says per process or per thread) and shared by its tasks.
``"value"``
    a value with state (a generator, a file position): built anew every time
    it is unpickled, so each task gets it exactly as it was in the caller.
    :func:`track_stateful_values` counts these while bytes are made, so that
    bytes holding one (the mapped function) are never decoded once and reused.

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

import os
import threading
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from procession.serialization import _rebuild
from procession.serialization._tracking import (
    StatefulValues,
    note_stateful_value,
    track_stateful_values,
)
from procession.serialization.recipes import Recipe

__all__ = [
    "Adapter",
    "Kind",
    "StatefulValues",
    "find_adapter",
    "find_reducer",
    "reduce_with",
    "register_adapter",
    "register_builtin_adapter",
    "registered_adapters",
    "track_stateful_values",
    "unregister_adapter",
]

Reducer = Callable[[Any], Recipe[Any]]
#: What an adapter's Recipe stands for on the far side (see the module docstring).
Kind = Literal["resource", "value"]
_KINDS: tuple[str, ...] = ("resource", "value")


class Adapter(NamedTuple):
    """A registered adapter: its reduce function and the kind of object it sends."""

    reduce: Reducer
    kind: Kind


_lock = threading.RLock()
# Users' (and plug-ins') adapters, and procession's own, apart: unregistering a
# user's adapter brings back the built-in it replaced.  Each is keyed by type
# or by "module.QualName" (matched without importing the module).
_user: dict[type | str, Adapter] = {}
_builtin: dict[type | str, Adapter] = {}
# type -> adapter or None; emptied whenever the registry changes.
_lookup_cache: dict[type, Adapter | None] = {}
_entry_points_loaded = False


def _reset_lock_after_fork() -> None:
    # A thread of the parent may have held the lock when it forked; only the
    # forking thread exists in the child, so the registry gets a new lock.
    global _lock
    _lock = threading.RLock()


os.register_at_fork(after_in_child=_reset_lock_after_fork)


def _label(type_: type | str, caller: str) -> str:
    if isinstance(type_, str):
        if "." not in type_:
            raise ValueError(f"{caller}() needs a type or its 'module.QualName', got {type_!r}")
        return type_
    if isinstance(type_, type):
        return f"{type_.__module__}.{type_.__qualname__}"
    raise TypeError(
        f"{caller}() needs a type (or 'module.QualName') first, got {type(type_).__name__}"
    )


def _check_kind(kind: object, label: str) -> Kind:
    if kind not in _KINDS:
        raise ValueError(
            f"register_adapter({label}, ..., kind={kind!r}): kind must be 'resource' (built "
            f"once per worker and shared, like a connection) or 'value' (a value with state, "
            f"like a generator, rebuilt for every task)"
        )
    return kind  # type: ignore[return-value]


def register_adapter(type_: type | str, reduce: Reducer, *, kind: Kind = "resource") -> None:
    """Send objects of ``type_`` as the Recipe ``reduce(obj)`` returns.

    Example::

        procession.register_adapter(
            MyHandle, lambda h: procession.Recipe(MyHandle.open, h.path)
        )

    ``kind`` says what the Recipe stands for in the worker:

    ``"resource"`` (the default)
        a handle to something outside the process (a connection, an open
        file store, a client): built once per worker process (or thread, for
        a ``per_thread()`` Recipe) and shared by every task there.
    ``"value"``
        a value with state (an iterator, a cursor at a position): every task
        gets a fresh copy, exactly as it was in the caller, as a pickled list
        would arrive.  The Recipe is built on every unpickle, whatever its scope.

    ``type_`` may also be the type's ``"module.QualName"`` (as in
    ``f"{cls.__module__}.{cls.__qualname__}"``): a plug-in can then register
    without importing the library that defines the type.  Registering the same
    reducer (and kind) twice is harmless; a different one for a type that
    already has an adapter is an error (:func:`unregister_adapter` it first; a
    built-in adapter is replaced instead).  To refuse objects with advice,
    raise :class:`~procession.SerializationError` from ``reduce``.
    """
    label = _label(type_, "register_adapter")
    if not callable(reduce):
        raise TypeError(f"register_adapter({label}, ...) needs a callable reduce(obj) -> Recipe")
    adapter = Adapter(reduce, _check_kind(kind, label))
    with _lock:
        existing = _user.get(type_)
        if existing is not None and existing != adapter:
            raise ValueError(
                f"an adapter for {label} is already registered ({existing.reduce!r}, "
                f"kind={existing.kind!r}); call procession.unregister_adapter({label}) first "
                f"to replace it"
            )
        _user[type_] = adapter
        _lookup_cache.clear()


def unregister_adapter(type_: type | str) -> None:
    """Remove the adapter that :func:`register_adapter` registered for ``type_``.

    Example::

        procession.register_adapter(MyHandle, reduce_handle)
        try:
            ...
        finally:
            procession.unregister_adapter(MyHandle)

    ``type_`` is what was registered (the type, or its ``"module.QualName"``).
    If the adapter had replaced a built-in one, the built-in one applies again.
    Raises LookupError if ``type_`` has no adapter registered by a user or plug-in.
    """
    label = _label(type_, "unregister_adapter")
    _ensure_loaded()
    with _lock:
        if type_ in _user:
            del _user[type_]
            _lookup_cache.clear()
            return
        other = _label_twin(type_)
        if type_ in _builtin:
            reason = (
                "only procession's built-in adapter, which cannot be unregistered; "
                "register_adapter() replaces it"
            )
        elif other is not None:
            reason = f"no adapter under that key, but one under {other!r}: unregister that"
        else:
            reason = "no adapter registered"
        raise LookupError(f"cannot unregister the adapter for {label}: it has {reason}")


def _label_twin(type_: type | str) -> str | type | None:
    """The other key (type vs. name) under which an adapter for ``type_`` is registered."""
    if isinstance(type_, type):
        name = f"{type_.__module__}.{type_.__qualname__}"
        return name if name in _user else None
    for key in _user:
        if isinstance(key, type) and f"{key.__module__}.{key.__qualname__}" == type_:
            return key
    return None


def register_builtin_adapter(
    type_: type | str, reduce: Reducer, *, kind: Kind = "resource"
) -> None:
    """Register one of procession's own adapters (a user's adapter replaces it).

    ``type_`` may be a ``"module.QualName"`` string, matched against the MRO
    of the objects being sent without importing that module.
    """
    adapter = Adapter(reduce, _check_kind(kind, _label(type_, "register_builtin_adapter")))
    with _lock:
        _builtin.setdefault(type_, adapter)
        _lookup_cache.clear()


def registered_adapters() -> dict[type, Reducer]:
    """A copy of the registry (built-ins, entry points and user adapters).

    Built-ins registered by name appear once their type has been imported.
    Use :func:`find_adapter` for an adapter's kind.
    """
    _ensure_loaded()
    import sys

    with _lock:
        found: dict[type, Reducer] = {}
        # Users' adapters first: they replace the built-ins.
        for table in (_user, _builtin):
            for key, adapter in table.items():
                if isinstance(key, str):
                    module, _, qualname = key.rpartition(".")
                    cls = getattr(sys.modules.get(module), qualname, None)
                    if not isinstance(cls, type):
                        continue
                    key = cls
                found.setdefault(key, adapter.reduce)
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


def find_adapter(cls: type) -> Adapter | None:
    """The adapter (reduce function and kind) for ``cls``, searching its MRO, or None.

    Example::

        assert find_adapter(types.GeneratorType).kind == "value"
    """
    try:
        return _lookup_cache[cls]
    except KeyError:
        pass
    _ensure_loaded()
    with _lock:
        found: Adapter | None = None
        for base in cls.__mro__:
            name = f"{base.__module__}.{base.__qualname__}"
            # On each base a user's adapter (by type, then by name) beats a built-in.
            for table in (_user, _builtin):
                found = table.get(base) or table.get(name)
                if found is not None:
                    break
            if found is not None:
                break
        _lookup_cache[cls] = found
        return found


def find_reducer(cls: type) -> Reducer | None:
    """The adapter's reduce function for ``cls`` (searching its MRO), or None."""
    adapter = find_adapter(cls)
    return None if adapter is None else adapter.reduce


def reduce_with(reduce: Reducer, obj: Any) -> tuple[Any, ...]:
    """Run an adapter and turn its Recipe into a pickle reduce tuple.

    A ``kind="value"`` adapter's Recipe is rebuilt on every unpickle (scope
    ``"fresh"``) and counted by :func:`track_stateful_values`.
    """
    recipe = reduce(obj)
    if not isinstance(recipe, Recipe):
        raise TypeError(
            f"the adapter for {type(obj).__qualname__} returned {type(recipe).__name__}, "
            f"not a procession.Recipe"
        )
    adapter = find_adapter(type(obj))
    if adapter is not None and adapter.reduce is reduce and adapter.kind == "value":
        # Whatever scope the adapter chose: a value is built anew on every unpickle.
        note_stateful_value()
        return (_rebuild.call, (recipe.factory, recipe.args, recipe.kwargs))
    return recipe.__reduce__()
