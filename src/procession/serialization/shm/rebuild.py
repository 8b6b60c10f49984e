"""Rebuild functions for large buffers: small and stable, their paths end up inside pickles.

Imports nothing from procession (and numpy only inside the functions that need
it), so loading a task never pulls in more than this.
"""

from __future__ import annotations

from typing import Any

__all__ = ["bytearray_from", "memmap_from_file", "memoryview_from"]


def bytearray_from(buffer: Any) -> bytearray:
    """A ``bytearray`` owns its memory, so it is one copy out of the shared segment."""
    return bytearray(buffer)


def memoryview_from(buffer: Any, format: str, shape: tuple[int, ...], readonly: bool) -> memoryview:
    """A memoryview of ``buffer`` (shared memory, or bytes sent in-band) as it was sent."""
    view: Any = memoryview(buffer).cast("B")
    if readonly:
        view = view.toreadonly()
    if format == "B" and len(shape) == 1:
        return view  # type: ignore[no-any-return]
    return view.cast(format, shape)  # type: ignore[no-any-return]


def memmap_from_file(
    filename: str,
    mode: Any,
    start: int,
    span: int,
    dtype: Any,
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    first: int,
) -> Any:
    """Map ``span`` bytes of ``filename`` from ``start`` and view them as the sender's array.

    ``first`` is the offset of the array's first element within the mapped
    span (non-zero for negative strides).  A zero-length span cannot be mapped,
    so it becomes an empty array of the right type.
    """
    import numpy as np

    if span == 0:
        return np.ndarray(shape, dtype=dtype)
    itemsize = np.dtype(dtype).itemsize
    orders: Any = (
        ("C", _contiguous(shape, strides, itemsize, reverse=True)),
        ("F", _contiguous(shape, strides, itemsize, reverse=False)),
    )
    for order, contiguous in orders:
        if contiguous and first == 0:
            # A plain memmap of the range: the receiver sees filename, offset and mode.
            return np.memmap(
                filename, dtype=dtype, mode=mode, offset=start, shape=shape, order=order
            )
    # A strided view: an ndarray over a memmap of the range (its .base names the file).
    mapped = np.memmap(filename, dtype=np.uint8, mode=mode, offset=start, shape=(span,))
    return np.ndarray(shape, dtype=dtype, buffer=mapped, offset=first, strides=strides)


def _contiguous(
    shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int, *, reverse: bool
) -> bool:
    """Whether ``strides`` lay ``shape`` out contiguously in C (``reverse``) or F order.

    Worked out from the numbers (as numpy does for its flags): building a probe
    array to ask numpy would need a buffer as large as the array.
    """
    if 0 in shape:
        return True
    expected = itemsize
    dims = list(zip(shape, strides, strict=True))
    for size, stride in reversed(dims) if reverse else dims:
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True
