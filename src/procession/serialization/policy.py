"""Opt-in policies for objects that procession refuses to send by default.

Two built-in adapters refuse by default because sending the object would
silently change its meaning; a policy lets the caller say that the change is
wanted:

``started_generators="drain"``
    a generator that has already yielded is drained to a list in the caller,
    and the worker receives that list (default ``"refuse"``: SerializationError).
``memory_databases="snapshot"``
    an in-memory ``sqlite3`` database is copied with ``Connection.serialize()``
    and each worker thread gets its own in-memory copy (default ``"refuse"``).

Example::

    from procession.serialization import policy

    with policy(started_generators="drain"):
        results = list(procession.map(total, [started_generator]))

Serialization happens when work is sent, which for the lazy
:func:`procession.map` means while you iterate over it: consume the results
inside the ``with`` block.  The policy is held in a :mod:`contextvars`
variable, so it applies to the current thread (and asyncio task) only.
For a single object, :func:`snapshot` is the explicit alternative.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import sqlite3

    from procession.serialization.recipes import Recipe

__all__ = ["Policy", "current_policy", "policy", "snapshot"]

StartedGenerators = Literal["refuse", "drain"]
MemoryDatabases = Literal["refuse", "snapshot"]


@dataclass(frozen=True)
class Policy:
    """What the built-in adapters do with objects they refuse by default."""

    started_generators: StartedGenerators = "refuse"
    memory_databases: MemoryDatabases = "refuse"


_DEFAULT = Policy()
# Policy is frozen, so sharing one default instance is safe.
_current: contextvars.ContextVar[Policy] = contextvars.ContextVar(
    "procession_serialization_policy",
    default=_DEFAULT,
)


def current_policy() -> Policy:
    """The policy in force in this thread / context."""
    return _current.get()


@contextmanager
def policy(
    *,
    started_generators: StartedGenerators | None = None,
    memory_databases: MemoryDatabases | None = None,
) -> Iterator[Policy]:
    """Change what the built-in adapters do, for the duration of a ``with`` block.

    Example::

        with procession.serialization.policy(memory_databases="snapshot"):
            rows = list(procession.map(count_rows, tables, serializer="pickle"))
    """
    changes: dict[str, str] = {}
    if started_generators is not None:
        if started_generators not in ("refuse", "drain"):
            raise ValueError(
                f"started_generators must be 'refuse' or 'drain', got {started_generators!r}"
            )
        changes["started_generators"] = started_generators
    if memory_databases is not None:
        if memory_databases not in ("refuse", "snapshot"):
            raise ValueError(
                f"memory_databases must be 'refuse' or 'snapshot', got {memory_databases!r}"
            )
        changes["memory_databases"] = memory_databases
    chosen = replace(_current.get(), **changes)  # type: ignore[arg-type]
    token = _current.set(chosen)
    try:
        yield chosen
    finally:
        _current.reset(token)


def snapshot(conn: sqlite3.Connection) -> Recipe[sqlite3.Connection]:
    """A Recipe for an in-memory copy of ``conn``'s main database, made now.

    Each worker thread deserializes its own copy once; writes to a copy stay in
    that worker.

    Example::

        mem = sqlite3.connect(":memory:")
        ...
        procession.map(functools.partial(query, db=snapshot(mem)), keys)
    """
    from procession.serialization.builtin_adapters import sqlite_snapshot_recipe

    return sqlite_snapshot_recipe(conn)
