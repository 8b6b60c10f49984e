"""Serializers: how task and result bytes are made.

Scope: short-lived transport between processes running the same Python and
the same code.  Not a storage format: bytes written by one version of a
program are not meant to be read by another.

Every serializer applies procession's adapter registry (through
``reducer_override``, on a pickler subclass of our own: we never touch
``copyreg`` or another library's global pickler), so a ``sqlite3.Connection``
or a generator is turned into a :class:`~procession.Recipe` whatever the
serializer.

The built-in serializers take pickle protocol 5's ``buffer_callback=`` (in
``dumps``) and ``buffers=`` (in ``loads``): large buffers then leave the byte
stream and travel through shared memory (:mod:`procession.serialization.shm`).
In that out-of-band mode they also send ``numpy.memmap`` arrays by file name,
copy non-contiguous arrays once into a contiguous buffer, and let
``bytearray`` buffers out of band; ``memoryview`` objects pickle in either mode.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
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
    #: Whether ``dumps`` takes ``buffer_callback=`` and ``loads`` takes ``buffers=``
    #: (pickle protocol 5 out-of-band buffers); only then do large buffers go
    #: through shared memory.
    supports_buffers: bool = False

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


BufferCallback = Callable[[pickle.PickleBuffer], Any]


def _adapter_override(obj: Any) -> Any:
    """Return a reduce tuple when an adapter claims ``obj``, else NotImplemented."""
    reduce = adapters.find_reducer(type(obj))
    if reduce is None:
        return NotImplemented
    return adapters.reduce_with(reduce, obj)


def _reduce_memoryview(view: memoryview) -> Any:
    from procession.serialization.shm import rebuild

    # PickleBuffer needs a contiguous buffer; a strided view is copied once.
    source: Any = view
    if not view.c_contiguous:
        source = memoryview(view.tobytes()).cast(view.format, view.shape)  # type: ignore[call-overload]
    return (
        rebuild.memoryview_from,
        (pickle.PickleBuffer(source), view.format, view.shape, view.readonly),
    )


def _reduce_bytearray(data: bytearray) -> Any:
    from procession.serialization.shm import rebuild

    return (rebuild.bytearray_from, (pickle.PickleBuffer(data),))


def _numpy_reduce(obj: Any, buffer_callback: BufferCallback) -> Any:
    """Large-buffer rules for numpy arrays in out-of-band mode (NotImplemented: numpy's own)."""
    np = sys.modules["numpy"]
    if obj.dtype.hasobject:
        return NotImplemented
    if isinstance(obj, np.memmap):
        return _reduce_memmap(obj, np, buffer_callback)
    if type(obj) is np.ndarray:
        if not (obj.flags.c_contiguous or obj.flags.f_contiguous):
            # numpy would send a strided array in-band; one contiguous copy lets it out of band.
            obj = np.ascontiguousarray(obj)
        # numpy's protocol-5 reduction (a PickleBuffer), asked for explicitly: dill's
        # pickler would otherwise use its own, in-band one.
        return obj.__reduce_ex__(PROTOCOL)
    return NotImplemented


def _reduce_memmap(array: Any, np: Any, buffer_callback: BufferCallback) -> Any:
    """Send a file-backed array as (file name, byte range): the receiver maps the same file."""
    from procession.serialization.shm import rebuild

    top = array
    while isinstance(top.base, np.ndarray):
        top = top.base
    if not isinstance(top, np.memmap) or not top.filename or top.size == 0:
        return NotImplemented  # not backed by a named file we can reopen: numpy's own pickling
    if not getattr(buffer_callback, "memmaps_by_name", True):
        # Workers elsewhere (a backend's store): the data travel, as a plain array
        # (numpy sends a subclass in-band; its ndarray view goes out of band).
        plain = np.asarray(array)
        if not (plain.flags.c_contiguous or plain.flags.f_contiguous):
            plain = np.ascontiguousarray(plain)
        return plain.__reduce_ex__(PROTOCOL)
    try:
        from numpy.lib.array_utils import byte_bounds
    except ImportError:  # numpy < 2
        byte_bounds = np.byte_bounds
    low, high = byte_bounds(array)
    top_address = top.__array_interface__["data"][0]
    address = array.__array_interface__["data"][0]
    start = top.offset + (low - top_address)
    mode = "r" if top.mode == "r" else "c"  # workers write copy-on-write, never to the file
    filename = os.fspath(top.filename)
    note = getattr(buffer_callback, "note_file", None)
    if note is not None:
        note(filename, start, high - low)
    return (
        rebuild.memmap_from_file,
        (
            filename,
            mode,
            start,
            high - low,
            array.dtype,
            array.shape,
            array.strides,
            address - low,
        ),
    )


def _buffer_override(obj: Any, buffer_callback: BufferCallback | None) -> Any:
    """How buffer types pickle here; NotImplemented leaves ``obj`` to the usual rules."""
    cls = type(obj)
    if cls is memoryview:
        return _reduce_memoryview(obj)
    if buffer_callback is None:
        return NotImplemented
    if cls is bytearray:
        return _reduce_bytearray(obj)
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(obj, numpy.ndarray):
        return _numpy_reduce(obj, buffer_callback)
    return NotImplemented


class _AdaptingPickler(pickle.Pickler):
    def __init__(
        self, file: Any, protocol: int, buffer_callback: BufferCallback | None = None
    ) -> None:
        super().__init__(file, protocol=protocol, buffer_callback=buffer_callback)
        self._buffer_callback = buffer_callback

    def reducer_override(self, obj: Any) -> Any:
        reduced = _adapter_override(obj)
        if reduced is NotImplemented:
            return _buffer_override(obj, self._buffer_callback)
        return reduced


class PickleSerializer(Serializer):
    """The standard library's pickle, protocol 5, plus procession's adapters."""

    name = "pickle"
    supports_buffers = True

    def dumps(self, obj: Any, buffer_callback: BufferCallback | None = None) -> bytes:
        buffer = io.BytesIO()
        _AdaptingPickler(buffer, PROTOCOL, buffer_callback).dump(obj)
        return buffer.getvalue()

    def loads(self, data: bytes, buffers: Iterable[Any] | None = None) -> Any:
        return pickle.loads(data, buffers=buffers)


class CloudpickleSerializer(Serializer):
    """cloudpickle: lambdas, closures and ``__main__`` functions by value."""

    name = "cloudpickle"
    sends_code_by_value = True
    supports_buffers = True

    def __init__(self) -> None:
        self._pickler_class: type[Any] | None = None

    def _pickler(self) -> type[Any]:
        if self._pickler_class is None:
            import cloudpickle

            class AdaptingCloudPickler(cloudpickle.CloudPickler):  # type: ignore[misc]
                def __init__(
                    self, file: Any, protocol: int, buffer_callback: BufferCallback | None = None
                ) -> None:
                    super().__init__(file, protocol=protocol, buffer_callback=buffer_callback)
                    self._buffer_callback = buffer_callback

                def reducer_override(self, obj: Any) -> Any:
                    reduced = _adapter_override(obj)
                    if reduced is NotImplemented:
                        reduced = _buffer_override(obj, self._buffer_callback)
                    if reduced is NotImplemented:
                        return super().reducer_override(obj)
                    return reduced

            self._pickler_class = AdaptingCloudPickler
        return self._pickler_class

    def dumps(self, obj: Any, buffer_callback: BufferCallback | None = None) -> bytes:
        buffer = io.BytesIO()
        self._pickler()(buffer, PROTOCOL, buffer_callback).dump(obj)
        return buffer.getvalue()

    def loads(self, data: bytes, buffers: Iterable[Any] | None = None) -> Any:
        return pickle.loads(data, buffers=buffers)


class DillSerializer(Serializer):
    """dill: also sends generators' code, nested functions and more by value."""

    name = "dill"
    sends_code_by_value = True
    supports_buffers = True

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
                def __init__(self, file: Any, *args: Any, **kwargs: Any) -> None:
                    super().__init__(file, *args, **kwargs)
                    self._buffer_callback = kwargs.get("buffer_callback")

                def reducer_override(self, obj: Any) -> Any:
                    reduced = _adapter_override(obj)
                    if reduced is NotImplemented:
                        return _buffer_override(obj, self._buffer_callback)
                    return reduced

            self._pickler_class = AdaptingDillPickler
        return self._pickler_class

    def dumps(self, obj: Any, buffer_callback: BufferCallback | None = None) -> bytes:
        buffer = io.BytesIO()
        self._pickler()(
            buffer, protocol=PROTOCOL, recurse=True, buffer_callback=buffer_callback
        ).dump(obj)
        return buffer.getvalue()

    def loads(self, data: bytes, buffers: Iterable[Any] | None = None) -> Any:
        import dill

        return dill.loads(data, buffers=buffers)


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
