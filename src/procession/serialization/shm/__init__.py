"""Zero-copy large buffers: what goes through shared memory instead of the pipe.

Pickle protocol 5 lets a pickler hand large buffers (numpy arrays, ``bytes``,
``bytearray``, ``memoryview``, pyarrow buffers, anything that exposes
``PickleBuffer``) to a ``buffer_callback`` instead of copying them into the
byte stream.  On backends whose workers run on this machine (``process``,
``loky``, ``multiprocessing``: ``capabilities.isolated`` and not ``remote``),
every buffer of at least :func:`threshold` bytes travels through a file in
``/dev/shm``, in both directions; smaller ones stay in the byte stream, so
small arguments cost what they always did.

Scope: same-machine transport for the life of one map.  Not a cache, not
shared state: a worker's writes never reach the parent (copy-on-write).
See ``docs/large-data.md`` for the guide.

Example::

    with procession.serialization.shm.large_buffers(threshold="64MiB"):
        totals = list(procession.map(np.sum, arrays))
"""

from __future__ import annotations

import contextvars
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from procession.serialization.shm.arena import (
    IN_BAND,
    Arena,
    InBand,
    Reply,
    SharedMemoryFullWarning,
    StoredArena,
    load_payload,
    owner_prefix,
    segment_names,
)
from procession.serialization.shm.shared import shared_array

if TYPE_CHECKING:
    from procession.backends.base import Backend

__all__ = [
    "DEFAULT_THRESHOLD",
    "ENV_THRESHOLD",
    "IN_BAND",
    "Arena",
    "InBand",
    "LargeBuffers",
    "Reply",
    "SharedMemoryFullWarning",
    "StoredArena",
    "arena_for",
    "current",
    "large_buffers",
    "load_payload",
    "owner_prefix",
    "parse_size",
    "segment_names",
    "shared_array",
]

#: Buffers of at least this many bytes go through shared memory by default (1 MiB).
DEFAULT_THRESHOLD = 1 << 20
#: Environment variable that sets the default threshold (``"4MiB"``, ``"off"``).
ENV_THRESHOLD = "PROCESSION_SHM_THRESHOLD"

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20}
_UNITS |= {"mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_size(value: int | str) -> int:
    """``1048576``, ``"1MiB"``, ``"512k"`` -> bytes (binary units).

    Example::

        parse_size("4MiB")  # 4194304
    """
    if isinstance(value, bool):
        raise TypeError(f"a size must be bytes (int) or a string like '4MiB', got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"cannot read {value!r} as a size; write e.g. 1048576, '512KiB', '4MiB'"
            )
        size = int(float(match.group(1)) * _UNITS[unit])
    else:
        raise TypeError(f"a size must be bytes (int) or a string like '4MiB', got {value!r}")
    if size < 1:
        raise ValueError(f"the threshold must be at least 1 byte, got {value!r}")
    return size


@dataclass(frozen=True)
class LargeBuffers:
    """The large-buffer settings in force: on or off, and the threshold in bytes."""

    enabled: bool = True
    threshold: int = DEFAULT_THRESHOLD


def _from_environment() -> LargeBuffers:
    raw = os.environ.get(ENV_THRESHOLD, "").strip()
    if not raw:
        return LargeBuffers()
    if raw.lower() in ("off", "none", "0", "false"):
        return LargeBuffers(enabled=False)
    try:
        return LargeBuffers(threshold=parse_size(raw))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"environment variable {ENV_THRESHOLD}: {exc}") from None


_current: contextvars.ContextVar[LargeBuffers | None] = contextvars.ContextVar(
    "procession_large_buffers", default=None
)


def current() -> LargeBuffers:
    """The settings in force here: a :func:`large_buffers` block, else the environment."""
    chosen = _current.get()
    return chosen if chosen is not None else _from_environment()


@contextmanager
def large_buffers(
    *, threshold: int | str | None = None, enabled: bool | None = None
) -> Iterator[LargeBuffers]:
    """Change the threshold (or turn shared memory off) for maps started in this block.

    The settings are read when a map starts (``procession.map(...)`` or
    ``Executor.submit``), so the block only has to enclose that call.

    Example::

        with procession.serialization.shm.large_buffers(threshold="16MiB"):
            run = procession.map(np.sum, arrays)
        print(list(run))
    """
    settings = current()
    if threshold is not None:
        settings = LargeBuffers(settings.enabled, parse_size(threshold))
    if enabled is not None:
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be True or False, got {enabled!r}")
        settings = LargeBuffers(enabled, settings.threshold)
    token = _current.set(settings)
    try:
        yield settings
    finally:
        _current.reset(token)


def arena_for(backend: Backend, *, stable_source: bool = False) -> InBand:
    """Where ``backend``'s large buffers go for one map: an :class:`Arena` (shared
    memory) when its workers share this machine's memory, a :class:`StoredArena`
    when it keeps buffers itself (``Capabilities.buffer_store``), else in-band.

    ``stable_source``: the items are a list or tuple made before the map, so an
    object sent twice need not be checked for changes in between.

    Example::

        arena = arena_for(backend)   # the scheduler calls this once per map
    """
    settings = current()
    capabilities = backend.capabilities
    if not settings.enabled:
        return IN_BAND
    if capabilities.isolated and not capabilities.remote:
        return Arena(settings.threshold, stable_source=stable_source)
    if capabilities.buffer_store:
        return StoredArena(settings.threshold, backend, stable_source=stable_source)
    return IN_BAND
