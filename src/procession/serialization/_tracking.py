"""Which values with state went into the bytes being made (a leaf module).

A *value with state* (an unstarted generator, a read-only file at a
position, any ``Recipe.fresh()``) is rebuilt on every unpickle.  Bytes that
hold one must be unpickled once per use: a worker that decoded a function
once and reused it for every task would hand the second task the generator
the first one exhausted.  The scheduler therefore serializes the mapped
function inside :func:`track_stateful_values` and, when ``count`` is not
zero, has the worker rebuild the function for every call.

This module imports nothing from procession, so that every module of
:mod:`procession.serialization` (and the small, stable ``_rebuild``) may use it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["StatefulValues", "note_stateful_value", "track_stateful_values"]


class StatefulValues:
    """What :func:`track_stateful_values` saw: ``count`` values with state."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def __repr__(self) -> str:
        return f"StatefulValues(count={self.count})"


# Per thread: two threads serializing at once (threads backend, a pipeline's
# stages) must not count each other's values.
_local = threading.local()


@contextmanager
def track_stateful_values() -> Iterator[StatefulValues]:
    """Count the values with state serialized by this thread inside the block.

    Example::

        with track_stateful_values() as seen:
            data = get_serializer("pickle").dumps(partial(sum, numbers(3)))
        assert seen.count == 1   # the worker must unpickle it for every call

    Blocks nest: a value counts in every block that is open in this thread.
    """
    seen = StatefulValues()
    active: list[StatefulValues] | None = getattr(_local, "active", None)
    if active is None:
        active = _local.active = []
    active.append(seen)
    try:
        yield seen
    finally:
        active.remove(seen)


def note_stateful_value() -> None:
    """Record that a value with state is being serialized (no-op outside a block)."""
    active: list[StatefulValues] | None = getattr(_local, "active", None)
    if active:
        for seen in active:
            seen.count += 1
