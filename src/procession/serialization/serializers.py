"""Serializers: how task and result bytes are made.

Scope: short-lived transport between processes running the same Python and
the same code.  Not a storage format: bytes written by one version of a
program are not meant to be read by another.

Every serializer applies procession's adapter registry (through
``reducer_override``, on a pickler subclass of our own: we never touch
``copyreg`` or another library's global pickler), so a ``sqlite3.Connection``
or a generator is turned into a :class:`~procession.Recipe` whatever the
serializer.
"""

from __future__ import annotations

import io
import pickle
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from procession.errors import ProcessionError
from procession.serialization import adapters

__all__ = [
    "CloudpickleSerializer",
    "DillSerializer",
    "PickleSerializer",
    "Serializer",
    "get_serializer",
    "register_serializer",
    "serializer_names",
]

PROTOCOL = 5


class Serializer(ABC):
    """Turns objects into bytes and back.  Subclass it to add a serializer.

    Example::

        class JsonSerializer(Serializer):
            name = "json"
            def dumps(self, obj): return json.dumps(obj).encode()
            def loads(self, data): return json.loads(data)

        procession.register_serializer(JsonSerializer())
    """

    #: The name users pass as ``serializer=``.
    name: str = ""
    #: Whether functions defined in ``__main__``, lambdas and closures travel by value.
    sends_code_by_value: bool = False

    @abstractmethod
    def dumps(self, obj: Any) -> bytes:
        """Serialize ``obj``; raise any exception on failure (it is diagnosed)."""

    @abstractmethod
    def loads(self, data: bytes) -> Any:
        """Rebuild an object from ``dumps`` output."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    def __reduce__(self) -> tuple[Any, ...]:
        # Serializers travel by name: each process uses its own instance.
        return (get_serializer, (self.name,))


def _adapter_override(obj: Any) -> Any:
    """Return a reduce tuple when an adapter claims ``obj``, else NotImplemented."""
    reduce = adapters.find_reducer(type(obj))
    if reduce is None:
        return NotImplemented
    return adapters.reduce_with(reduce, obj)


class _AdaptingPickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        return _adapter_override(obj)


class PickleSerializer(Serializer):
    """The standard library's pickle, protocol 5, plus procession's adapters."""

    name = "pickle"

    def dumps(self, obj: Any) -> bytes:
        buffer = io.BytesIO()
        _AdaptingPickler(buffer, protocol=PROTOCOL).dump(obj)
        return buffer.getvalue()

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)


class CloudpickleSerializer(Serializer):
    """cloudpickle: lambdas, closures and ``__main__`` functions by value."""

    name = "cloudpickle"
    sends_code_by_value = True

    def __init__(self) -> None:
        self._pickler_class: type[Any] | None = None

    def _pickler(self) -> type[Any]:
        if self._pickler_class is None:
            import cloudpickle

            class AdaptingCloudPickler(cloudpickle.CloudPickler):  # type: ignore[misc]
                def reducer_override(self, obj: Any) -> Any:
                    reduced = _adapter_override(obj)
                    if reduced is NotImplemented:
                        return super().reducer_override(obj)
                    return reduced

            self._pickler_class = AdaptingCloudPickler
        return self._pickler_class

    def dumps(self, obj: Any) -> bytes:
        buffer = io.BytesIO()
        self._pickler()(buffer, protocol=PROTOCOL).dump(obj)
        return buffer.getvalue()

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)


class DillSerializer(Serializer):
    """dill: also sends generators' code, nested functions and more by value."""

    name = "dill"
    sends_code_by_value = True

    def __init__(self) -> None:
        self._pickler_class: type[Any] | None = None

    def _pickler(self) -> type[Any]:
        if self._pickler_class is None:
            try:
                import dill
            except ImportError as exc:
                raise ProcessionError(
                    "serializer 'dill' needs the dill package: pip install 'procession[dill]'"
                ) from exc

            class AdaptingDillPickler(dill.Pickler):  # type: ignore[misc]
                def reducer_override(self, obj: Any) -> Any:
                    return _adapter_override(obj)

            self._pickler_class = AdaptingDillPickler
        return self._pickler_class

    def dumps(self, obj: Any) -> bytes:
        buffer = io.BytesIO()
        self._pickler()(buffer, protocol=PROTOCOL, recurse=True).dump(obj)
        return buffer.getvalue()

    def loads(self, data: bytes) -> Any:
        import dill

        return dill.loads(data)


_registry_lock = threading.Lock()
_serializers: dict[str, Serializer] = {}
_factories: dict[str, Callable[[], Serializer]] = {
    "pickle": PickleSerializer,
    "cloudpickle": CloudpickleSerializer,
    "dill": DillSerializer,
}


def register_serializer(serializer: Serializer) -> None:
    """Make ``serializer`` available by its ``name`` (``serializer="json"``).

    Registering the same object twice is harmless; a different serializer under
    a taken name is an error.

    Example::

        json_serializer = JsonSerializer()          # see Serializer's example
        procession.register_serializer(json_serializer)
        assert "json" in procession.serializers
    """
    if not isinstance(serializer, Serializer):
        raise TypeError(
            f"register_serializer() needs a procession.Serializer instance, "
            f"got {type(serializer).__name__}"
        )
    if not serializer.name:
        raise ValueError(f"{serializer!r} has an empty name; set the class attribute 'name'")
    with _registry_lock:
        existing = _serializers.get(serializer.name)
        if existing is not None and existing is not serializer:
            raise ValueError(f"a serializer named {serializer.name!r} is already registered")
        if existing is None and serializer.name in _factories:
            raise ValueError(f"{serializer.name!r} is a built-in serializer name; pick another")
        _serializers[serializer.name] = serializer


def serializer_names() -> tuple[str, ...]:
    """Names accepted by ``serializer=``, built-ins first."""
    with _registry_lock:
        return tuple(dict.fromkeys([*_factories, *_serializers]))


def get_serializer(spec: str | Serializer | None, default: str = "cloudpickle") -> Serializer:
    """Resolve ``serializer=`` (a name, an instance, or None for ``default``)."""
    if isinstance(spec, Serializer):
        return spec
    name = default if spec is None else spec
    if not isinstance(name, str):
        raise TypeError(
            f"serializer= must be a name or a procession.Serializer, got {type(spec).__name__}"
        )
    with _registry_lock:
        found = _serializers.get(name)
        if found is None and name in _factories:
            found = _serializers[name] = _factories[name]()
    if found is None:
        raise ValueError(
            f"unknown serializer {name!r}; choose one of {', '.join(serializer_names())}"
        )
    return found
