"""Arrays that live in shared memory for as long as you keep them.

A plain numpy array is written to shared memory once per map, because the
parent may change it between maps and a worker must see it as it is.  An
array made by :func:`shared_array` already *is* a file in ``/dev/shm`` (a
``numpy.memmap``): every map sends only its name, whatever its size, and a
change the parent makes is what the next map's workers read.  Workers map it
copy-on-write, so a task's writes stay its own.

The file is removed when the last array using it is garbage-collected, when
the parent exits, or, if the parent is killed, by the cleanup process that
sweeps every procession segment of that parent.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import weakref
from typing import Any, Literal

from procession.serialization.shm import arena

__all__ = ["shared_array"]

_numbers = itertools.count()


def shared_array(
    data: Any = None,
    *,
    shape: int | tuple[int, ...] | None = None,
    dtype: Any = None,
    order: Literal["C", "F"] = "C",
) -> Any:
    """A numpy array in shared memory that maps send to workers by name, never copied.

    ``shared_array(a)`` copies ``a`` once; ``shared_array(shape=..., dtype=...)``
    makes a zero-filled one.  Use it for a large array sent to many maps: a
    plain array is written to shared memory again by every map.

    Example::

        import numpy as np
        from procession.serialization import shm

        a = shm.shared_array(np.arange(10_000_000, dtype=np.float64))
        for _ in range(3):
            totals = list(procession.map(np.sum, [a, a]))   # nothing copied
        a += 1          # the next map sees this: workers map the same file
    """
    import numpy as np

    if data is None:
        if shape is None:
            raise TypeError("shared_array() needs data to copy, or shape= (and dtype=)")
        template = None
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        kind = np.dtype(float if dtype is None else dtype)
    else:
        if shape is not None:
            raise TypeError("give shared_array() data or shape=, not both")
        template = np.asarray(data, dtype=dtype)
        dims, kind = template.shape, template.dtype
    if kind.hasobject:
        raise TypeError(
            f"shared_array() cannot hold dtype {kind} (Python objects are not bytes in memory); "
            "send such arrays as they are"
        )
    if order not in ("C", "F"):
        raise ValueError(f"order must be 'C' or 'F', got {order!r}")
    nbytes = int(np.prod(dims, dtype=np.int64)) * kind.itemsize
    if nbytes == 0:
        raise ValueError("shared_array() cannot make an empty array (nothing to map)")
    path = _new_file(nbytes)
    try:
        mapped = np.memmap(path, dtype=kind, mode="r+", shape=dims, order=order)
        if template is not None:
            mapped[...] = template
    except BaseException:
        _unlink(path)
        raise
    # Every view of it keeps this mapping alive: the name goes with the last one.
    weakref.finalize(mapped.base, _unlink, path)
    return mapped


def _new_file(nbytes: int) -> str:
    owner = arena._get_owner()
    if owner.janitor is None:
        arena._start_janitor(owner)  # it sweeps this file too if the parent is killed
    name = f"{owner.prefix}shared-{next(_numbers)}"
    return arena.reserve_segment(name, nbytes, arena._directories())


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
