"""Rebuild functions whose import paths end up inside pickles.

Keep this module small and its names stable: bytes made by one process are
read by another, and both look these functions up by module and name.  The
functions run in the worker, when a task is unpickled.  This module imports
only the leaf :mod:`procession.serialization._cache`, never upward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from procession.serialization._cache import build_cached, build_thread_cached

if TYPE_CHECKING:
    import sqlite3


def build_recipe(
    key: bytes, factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Unpickling a Recipe yields the object it builds, cached per process."""
    return build_cached(key, factory, args, kwargs)


def build_recipe_per_thread(
    key: bytes, factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Unpickling a per-thread Recipe yields the object built once in this thread."""
    return build_thread_cached(key, factory, args, kwargs)


def call(factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Build a fresh object on every unpickle (for things that must not be shared)."""
    return factory(*args, **kwargs)


def sqlite_connect(
    uri: str,
    attached: tuple[tuple[str, str], ...],
    options: dict[str, Any],
    attributes: dict[str, Any],
) -> sqlite3.Connection:
    """Reopen a file database (and the databases attached to it) from its URI."""
    import sqlite3

    conn: sqlite3.Connection = sqlite3.connect(uri, uri=True, **options)
    for name, attached_uri in attached:
        conn.execute("ATTACH DATABASE ? AS " + _quote_identifier(name), (attached_uri,))
    for attribute, value in attributes.items():
        setattr(conn, attribute, value)
    return conn


def sqlite_from_snapshot(
    data: bytes, options: dict[str, Any], attributes: dict[str, Any]
) -> sqlite3.Connection:
    """An in-memory database holding a copy of the sender's (``Connection.serialize()``)."""
    import sqlite3

    conn: sqlite3.Connection = sqlite3.connect(":memory:", **options)
    conn.deserialize(data)
    for attribute, value in attributes.items():
        setattr(conn, attribute, value)
    return conn


def reopen_file(
    path: str, mode: str, encoding: str | None, errors: str | None, position: int
) -> IO[Any]:
    """Open ``path`` read-only again and seek to where the sender's file object was.

    ``mode`` is ``"r"`` (text), ``"rb"`` (buffered) or ``"rb0"`` (unbuffered ``FileIO``).
    """
    if mode == "rb0":
        handle: IO[Any] = open(path, "rb", buffering=0)  # noqa: SIM115 - the task owns it
    elif mode == "rb":
        handle = open(path, "rb")  # noqa: SIM115
    else:
        handle = open(path, mode, encoding=encoding, errors=errors)  # noqa: SIM115
    try:
        handle.seek(position)
    except BaseException:
        handle.close()
        raise
    return handle


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
