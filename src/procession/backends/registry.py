"""The backend registry: names -> Backend classes (or factories).

Built-in backends are a table of import paths, imported on first use, with an
install hint for the optional ones.  Plug-ins come from the entry-point group
``procession.backends``, read on first lookup (never at ``import procession``)
and imported only when used.
"""

from __future__ import annotations

import importlib
import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from procession.backends._resources import check_supported
from procession.backends.base import Backend, Capabilities
from procession.errors import BackendUnavailableError

__all__ = [
    "BackendInfo",
    "available_backends",
    "create_backend",
    "get_backend_class",
    "register_backend",
]

BackendFactory = Callable[..., Backend]

# name -> (import path "module:attr", pip install hint or None)
_BUILTINS: dict[str, tuple[str, str | None]] = {
    "serial": ("procession.backends.serial:SerialBackend", None),
    "threads": ("procession.backends.threads:ThreadBackend", None),
    "multiprocessing": ("procession.backends.multiprocessing:MultiprocessingBackend", None),
    "process": ("procession.backends.process:ProcessBackend", None),
    "loky": ("procession.backends.loky:LokyBackend", "pip install 'procession[loky]'"),
    "dask": ("procession.backends.dask:DaskBackend", "pip install 'procession[dask]'"),
}


@dataclass(frozen=True)
class BackendInfo:
    """What ``available_backends()`` says of one backend."""

    name: str
    installed: bool
    capabilities: Capabilities | None
    origin: str
    install_hint: str | None = None
    error: str | None = None
    default_serializer: str | None = None

    @property
    def usable(self) -> bool:
        return self.installed and self.error is None


@dataclass
class _Entry:
    origin: str
    target: str | BackendFactory
    install_hint: str | None = None
    loaded: BackendFactory | None = None


_lock = threading.RLock()
_entries: dict[str, _Entry] = {
    name: _Entry("built-in", path, hint) for name, (path, hint) in _BUILTINS.items()
}
_entry_points_read = False


def _validate(name: str, factory: Any, origin: str) -> BackendFactory:
    if inspect.isclass(factory):
        if not issubclass(factory, Backend):
            raise BackendUnavailableError(
                f"backend {name!r} from {origin} is {factory.__module__}.{factory.__qualname__}, "
                f"which is not a procession.Backend subclass; fix or uninstall that plug-in"
            )
        if inspect.isabstract(factory):
            missing = ", ".join(sorted(factory.__abstractmethods__))
            raise BackendUnavailableError(
                f"backend {name!r} from {origin} does not implement {missing}; "
                f"fix or uninstall that plug-in"
            )
        return factory
    if callable(factory):
        return factory  # type: ignore[no-any-return]
    raise BackendUnavailableError(
        f"backend {name!r} from {origin} is a {type(factory).__name__}, not a Backend "
        f"subclass or a factory returning one; fix or uninstall that plug-in"
    )


def register_backend(name: str, factory: BackendFactory | type[Backend]) -> None:
    """Register a backend under ``name``: a Backend subclass or a callable
    ``factory(**options) -> Backend``.

    Example::

        procession.register_backend("inline", InlineBackend)
        procession.map(f, items, backend="inline")

    Registering the same factory twice is harmless; another one under a taken
    name is an error.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"backend name must be a non-empty string, got {name!r}")
    validated = _validate(name, factory, "register_backend()")
    with _lock:
        _read_entry_points()
        existing = _entries.get(name)
        if existing is not None:
            if existing.loaded is validated or existing.target is validated:
                return
            raise ValueError(
                f"backend name {name!r} is already taken (by {existing.origin}); "
                f"register yours under another name"
            )
        _entries[name] = _Entry("registered at runtime", validated, loaded=validated)


def _read_entry_points() -> None:
    global _entry_points_read
    if _entry_points_read:
        return
    from importlib.metadata import entry_points

    with _lock:
        if _entry_points_read:
            return
        _entry_points_read = True
        for ep in entry_points(group="procession.backends"):
            if ep.name in _entries:
                continue  # a built-in or an earlier plug-in keeps its name
            dist = ep.dist.name if ep.dist is not None else "an unknown distribution"
            _entries[ep.name] = _Entry(f"distribution {dist}", ep.value, None)


def _load(name: str, entry: _Entry) -> BackendFactory:
    if entry.loaded is not None:
        return entry.loaded
    target = entry.target
    if isinstance(target, str):
        module_name, _, attr = target.partition(":")
        try:
            module = importlib.import_module(module_name)
            obj: Any = module
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as exc:
            hint = f" ({entry.install_hint})" if entry.install_hint else ""
            raise BackendUnavailableError(
                f"backend {name!r} from {entry.origin} failed to load: "
                f"{type(exc).__name__}: {exc}{hint}"
            ) from exc
        target = obj
    loaded = _validate(name, target, entry.origin)
    with _lock:
        entry.loaded = loaded
    return loaded


def _names() -> list[str]:
    _read_entry_points()
    with _lock:
        return list(_entries)


def get_backend_class(name: str) -> BackendFactory:
    """The registered factory for ``name`` (raises BackendUnavailableError)."""
    _read_entry_points()
    with _lock:
        entry = _entries.get(name)
    if entry is None:
        raise BackendUnavailableError(
            f"unknown backend {name!r}; registered backends are: {', '.join(_names())} "
            f"(a plug-in backend appears here once its distribution is installed)"
        )
    factory = _load(name, entry)
    if inspect.isclass(factory) and issubclass(factory, Backend):
        try:
            factory.check_available()
        except BackendUnavailableError:
            raise
        except ImportError as exc:
            hint = entry.install_hint or "install its dependencies"
            raise BackendUnavailableError(
                f"backend {name!r} is not usable here: {exc}; fix: {hint}"
            ) from exc
    return factory


def create_backend(name: str, **options: Any) -> Backend:
    """Make a backend instance with its options.

    Example::

        backend = procession.create_backend("process", workers=4, start_method="spawn")
        procession.map(f, items, backend=backend)
    """
    factory = get_backend_class(name)
    # memory_limit=/threads_per_worker=/env= a backend lacks: refused here, with the reason.
    options = check_supported(name, factory, options)
    backend = factory(**options)
    if not isinstance(backend, Backend):
        raise BackendUnavailableError(
            f"backend factory for {name!r} returned {type(backend).__name__}, not a Backend"
        )
    return backend


def available_backends() -> dict[str, BackendInfo]:
    """Every registered backend: installed?, capabilities, origin, install hint.

    Example::

        >>> sorted(procession.available_backends())[:2]
        ['dask', 'loky']
    """
    infos: dict[str, BackendInfo] = {}
    for name in _names():
        with _lock:
            entry = _entries[name]
        try:
            factory = get_backend_class(name)
        except BackendUnavailableError as exc:
            infos[name] = BackendInfo(
                name=name,
                installed=False,
                capabilities=None,
                origin=entry.origin,
                install_hint=entry.install_hint,
                error=str(exc),
            )
            continue
        caps = getattr(factory, "capabilities", None)
        infos[name] = BackendInfo(
            name=name,
            installed=True,
            capabilities=caps if isinstance(caps, Capabilities) else None,
            origin=entry.origin,
            install_hint=entry.install_hint,
            default_serializer=getattr(factory, "default_serializer", None),
        )
    return infos
