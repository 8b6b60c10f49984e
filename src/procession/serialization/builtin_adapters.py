"""Adapters for standard-library objects that pickle refuses.

Each adapter turns an object into a :class:`~procession.Recipe` (how the worker
rebuilds it) or refuses it with advice.  They apply under every serializer.
The kind says whether the worker shares one built object (a *resource*) or
builds it anew for every task (a *value* with state).

=========================  ========  ================================================
generator, unstarted       value     its generator function and arguments; each task
                                     gets a fresh, unstarted generator
generator, started         value     refused; ``policy(started_generators="drain")``
                                     sends the remaining items as a list
``sqlite3.Connection``     resource  reopened from its file (same read-only flag,
                                     same attached databases, ``row_factory`` /
                                     ``text_factory``), once per worker thread;
                                     in-memory databases refused unless
                                     ``policy(memory_databases="snapshot")``
read-only file objects     value     reopened by path, mode and encoding, at the
                                     same position; a new handle per task
write-mode / closed files  --        refused
locks, hashes, sockets,    --        refused, with advice (a Recipe, a Manager, or
cursors, coroutines, ...             sending the data instead)
=========================  ========  ================================================

Types are registered by name where possible, so that sending an object never
imports ``sqlite3``, ``socket`` or ``multiprocessing`` just to look it up.
"""

from __future__ import annotations

import gc
import inspect
import io
import os
import sys
import types
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from procession.errors import SerializationError
from procession.serialization import _rebuild
from procession.serialization.adapters import register_builtin_adapter
from procession.serialization.policy import current_policy
from procession.serialization.recipes import Recipe

if TYPE_CHECKING:
    import sqlite3

__all__ = ["register_builtin_adapters", "sqlite_snapshot_recipe"]


def _refuse(obj: Any, reason: str) -> SerializationError:
    cls = type(obj)
    name = f"{cls.__module__}.{cls.__qualname__}"
    return SerializationError(reason, type_name=name.removeprefix("builtins."))


def _refusal(advice: str) -> Callable[[Any], Recipe[Any]]:
    """An adapter that refuses its objects with ``advice`` (what to send instead)."""

    def refuse(obj: Any) -> Recipe[Any]:
        raise _refuse(obj, advice)

    return refuse


# What cannot cross a process boundary, and what to send instead.
_REFUSE_COROUTINE = _refusal(
    "coroutines and async generators run on this process's event loop and cannot be "
    "sent; send the async function and its arguments and run it in the worker "
    "(asyncio.run(fn(*args)))"
)
_REFUSE_SQLITE_CURSOR = _refusal(
    "a cursor is tied to its connection in this process; send the connection (it is "
    "reopened in the worker) or the query, and run it there"
)
_REFUSE_LOCK = _refusal(
    "a lock only works inside the process that made it. To share one between workers "
    "pass a multiprocessing.Manager().Lock() proxy; to give each worker its own, send "
    "procession.Recipe(threading.Lock); or avoid the lock and pass the data instead"
)
_REFUSE_MULTIPROCESSING_LOCK = _refusal(
    "multiprocessing locks and semaphores can only be inherited by processes at start, "
    "not sent with a task; pass a multiprocessing.Manager().Lock() proxy instead"
)
_REFUSE_HASH = _refusal(
    "a hash object's internal state cannot be copied to another process; send the data "
    "and hash it in the worker, or send obj.digest()/obj.hexdigest()"
)
_REFUSE_SOCKET = _refusal(
    "a socket belongs to this process; send the address and connect in the worker, e.g. "
    "procession.Recipe(socket.create_connection, (host, port))"
)
_REFUSE_SIMPLE_QUEUE = _refusal(
    "a thread queue only works inside one process; use a multiprocessing.Manager().Queue() "
    "proxy, or return results from the task instead"
)
_REFUSE_MMAP = _refusal(
    "a memory map belongs to this process; send the file path (and offsets) and map it "
    "in the worker, e.g. with a procession.Recipe"
)


# -- generators -------------------------------------------------------------

_drained: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()


def _generator_function(gen: types.GeneratorType[Any, Any, Any]) -> Any:
    """The function that made ``gen``: its frame references it (CPython 3.11+)."""
    code = gen.gi_code
    for referent in gc.get_referents(gen):
        if isinstance(referent, types.FunctionType) and referent.__code__ is code:
            return referent
    # Fall back to looking it up by name in its module (a module-level function).
    frame = gen.gi_frame
    module = sys.modules.get(frame.f_globals.get("__name__", "")) if frame is not None else None
    found: Any = module
    for part in gen.__qualname__.split("."):
        found = getattr(found, part, None)
    if isinstance(found, types.FunctionType) and found.__code__ is code:
        return found
    return None


def _generator_arguments(
    gen: types.GeneratorType[Any, Any, Any],
) -> tuple[list[Any], dict[str, Any]]:
    """The arguments an unstarted generator was called with, from its frame."""
    code = gen.gi_code
    frame = gen.gi_frame
    assert frame is not None  # an unstarted generator has its frame
    local = frame.f_locals
    names = code.co_varnames
    positional_count = code.co_argcount
    keyword_count = code.co_kwonlyargcount
    args = [local[name] for name in names[:positional_count]]
    keyword_names = names[positional_count : positional_count + keyword_count]
    kwargs = {name: local[name] for name in keyword_names}
    index = positional_count + keyword_count
    if code.co_flags & inspect.CO_VARARGS:
        args.extend(local[names[index]])
        index += 1
    if code.co_flags & inspect.CO_VARKEYWORDS:
        kwargs.update(local[names[index]])
    return args, kwargs


def _reduce_generator(gen: types.GeneratorType[Any, Any, Any]) -> Recipe[Any]:
    state = inspect.getgeneratorstate(gen)
    if state == inspect.GEN_CREATED:
        function = _generator_function(gen)
        if function is None:
            raise _refuse(
                gen,
                f"procession cannot find the generator function that made {gen.__qualname__}; "
                f"send the function and its arguments instead",
            )
        try:
            args, kwargs = _generator_arguments(gen)
        except KeyError as exc:
            raise _refuse(
                gen, f"the argument {exc} of the unstarted generator {gen.__qualname__} is unset"
            ) from None
        # A fresh generator per task: tasks must not consume each other's items.
        return Recipe(function, *args, **kwargs).fresh()
    if state in (inspect.GEN_SUSPENDED, inspect.GEN_CLOSED) and (
        current_policy().started_generators == "drain"
    ):
        # Remember what was drained: the same generator may be pickled again
        # (a chunk re-sent item by item, a diagnosis) and must send the same items.
        items = _drained.get(gen)
        if items is None:
            items = _drained[gen] = list(gen)
        return Recipe(list, items).fresh()
    if state == inspect.GEN_RUNNING:
        reason = "a generator cannot be sent from inside itself"
    else:
        done = "is exhausted" if state == inspect.GEN_CLOSED else "has already started"
        reason = (
            f"the generator {gen.__qualname__} {done}, so the worker cannot rebuild it from "
            f"its function and arguments; send an unstarted generator, pass list(gen), or opt "
            f"in to draining it to a list with "
            f'procession.serialization.policy(started_generators="drain")'
        )
    raise _refuse(gen, reason)


# -- sqlite3 ----------------------------------------------------------------

_SQLITE_ADVICE = (
    "send the database path and open it in the worker with "
    "procession.Recipe(sqlite3.connect, path).per_thread()"
)


def _sqlite_readonly(conn: sqlite3.Connection, path: str) -> bool:
    """Whether ``conn`` opened its main database read-only (mode=ro, immutable)."""
    flag = _sqlite_readonly_from_library(conn, path)
    if flag is not None:
        return flag
    return not os.access(path, os.W_OK)


def _sqlite_readonly_from_library(conn: sqlite3.Connection, path: str) -> bool | None:
    """Ask SQLite itself (``sqlite3_db_readonly``); None where that is not possible.

    Python < 3.13 does not expose the connection's open flags, so this reads
    the ``sqlite3 *`` handle that CPython keeps right after the object header of
    a connection, and checks it against the path SQLite reports before trusting it.
    """
    if sys.implementation.name != "cpython" or not (3, 11) <= sys.version_info[:2] < (3, 15):
        return None
    try:
        import _sqlite3
        import ctypes

        library = ctypes.CDLL(_sqlite3.__file__)
        handle = ctypes.c_void_p.from_address(id(conn) + object.__basicsize__).value
        if not handle:
            return None
        filename = library.sqlite3_db_filename
        filename.restype = ctypes.c_char_p
        filename.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        readonly = library.sqlite3_db_readonly
        readonly.restype = ctypes.c_int
        readonly.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        reported = filename(handle, b"main")
        if reported is None or os.fsdecode(reported) != path:
            return None
        result = readonly(handle, b"main")
    except (OSError, AttributeError, ImportError, ValueError):
        return None
    return None if result < 0 else bool(result)


def _sqlite_uri(path: str, readonly: bool) -> str:
    from urllib.parse import quote

    return f"file:{quote(path)}?mode={'ro' if readonly else 'rw'}"


def _sqlite_attributes(conn: sqlite3.Connection) -> tuple[dict[str, Any], dict[str, Any]]:
    import sqlite3

    options: dict[str, Any] = {"isolation_level": conn.isolation_level}
    if sqlite3.threadsafety == 3:
        # Serialized mode: SQLite locks each connection itself, so a connection
        # may be shared between threads.  That happens on the threads backend
        # when it is part of the mapped function, which a worker decodes once
        # per process; inside items each thread still builds its own.
        options["check_same_thread"] = False
    attributes: dict[str, Any] = {}
    if conn.row_factory is not None:
        attributes["row_factory"] = conn.row_factory
    if conn.text_factory is not str:
        attributes["text_factory"] = conn.text_factory
    return options, attributes


def _database_list(conn: sqlite3.Connection) -> list[tuple[int, str, str]]:
    import sqlite3

    try:
        return list(conn.execute("PRAGMA database_list").fetchall())
    except sqlite3.ProgrammingError as exc:
        raise _refuse(conn, f"the connection cannot be used ({exc}); {_SQLITE_ADVICE}") from None


def sqlite_snapshot_recipe(conn: sqlite3.Connection) -> Recipe[sqlite3.Connection]:
    """A per-thread Recipe for an in-memory copy of ``conn``'s main database."""
    _database_list(conn)  # refuses a closed connection clearly
    options, attributes = _sqlite_attributes(conn)
    data = conn.serialize()
    return Recipe(_rebuild.sqlite_from_snapshot, data, options, attributes).per_thread()


def _reduce_sqlite_connection(conn: sqlite3.Connection) -> Recipe[Any]:
    databases = _database_list(conn)
    main = next((file for _, name, file in databases if name == "main"), "")
    if not main:
        if current_policy().memory_databases == "snapshot":
            return sqlite_snapshot_recipe(conn)
        raise _refuse(
            conn,
            "it is an in-memory (or temporary) database, which exists only in this "
            "process; store it in a file and send that connection, or opt in to sending a "
            'copy with procession.serialization.policy(memory_databases="snapshot") or '
            "procession.serialization.snapshot(conn)",
        )
    if conn.in_transaction:
        raise _refuse(
            conn,
            f"it has uncommitted changes to {main}, which a worker's own connection "
            f"would not see; call conn.commit() before sending it",
        )
    attached: list[tuple[str, str]] = []
    for _, name, file in databases:
        if name in ("main", "temp"):
            continue
        if not file:
            raise _refuse(
                conn,
                f"its attached database {name!r} is in memory and cannot be reopened "
                f"in a worker; attach a file instead",
            )
        attached.append((name, _sqlite_uri(file, _sqlite_readonly(conn, file))))
    options, attributes = _sqlite_attributes(conn)
    uri = _sqlite_uri(main, _sqlite_readonly(conn, main))
    # Per thread: sqlite3 connections refuse use from another thread
    # (check_same_thread), which matters on the threads backend.
    return Recipe(_rebuild.sqlite_connect, uri, tuple(attached), options, attributes).per_thread()


# -- files ------------------------------------------------------------------


def _reduce_file(handle: Any) -> Recipe[Any]:
    if handle.closed:
        raise _refuse(handle, "the file is closed; send its path instead")
    name = getattr(handle, "name", None)
    if isinstance(handle, io.TextIOWrapper):
        mode = "r"
    elif isinstance(handle, io.FileIO):
        mode = "rb0"
    else:
        mode = "rb"
    if not handle.readable() or handle.writable():
        raise _refuse(
            handle,
            f"the file {name!r} is open for writing; only read-only files are reopened in "
            f"workers: return the data from the workers and write it in the caller, or send "
            f"the path and open it in the worker",
        )
    if not isinstance(name, str | bytes) or not os.path.isfile(name):
        raise _refuse(
            handle,
            f"the file {name!r} has no path a worker could reopen (a pipe, a terminal or a "
            f"file descriptor); read the data here and send it instead",
        )
    try:
        position = handle.tell()
    except OSError as exc:
        raise _refuse(
            handle,
            f"the position of {name!r} is unknown ({exc}); text files being iterated with "
            f"'for line in f' cannot tell() their position: use f.readline() or send the path",
        ) from None
    encoding = getattr(handle, "encoding", None) if mode == "r" else None
    errors = getattr(handle, "errors", None) if mode == "r" else None
    path = os.path.abspath(os.fsdecode(name))
    # A new handle per task: two tasks reading one shared handle would steal
    # each other's lines.
    return Recipe(_rebuild.reopen_file, path, mode, encoding, errors, position).fresh()


# -- what cannot cross a process boundary ------------------------------------


def _hash_types() -> set[type]:
    import hashlib

    found: set[type] = set()
    for name in sorted(hashlib.algorithms_guaranteed):
        # hashlib.new() may use OpenSSL where hashlib.<name>() uses a built-in type.
        try:
            found.add(type(hashlib.new(name)))
            found.add(type(getattr(hashlib, name)()))
        except (AttributeError, TypeError, ValueError):
            continue
    try:
        import _hashlib

        found.add(_hashlib.HMAC)
    except (ImportError, AttributeError):
        pass
    return found


def register_builtin_adapters() -> None:
    """Register the standard library's adapters (called once, on first lookup)."""
    import _thread

    register_builtin_adapter(types.GeneratorType, _reduce_generator, kind="value")
    register_builtin_adapter(types.CoroutineType, _REFUSE_COROUTINE)
    register_builtin_adapter(types.AsyncGeneratorType, _REFUSE_COROUTINE)
    register_builtin_adapter("sqlite3.Connection", _reduce_sqlite_connection, kind="resource")
    register_builtin_adapter("sqlite3.Cursor", _REFUSE_SQLITE_CURSOR)
    register_builtin_adapter("sqlite3.Blob", _REFUSE_SQLITE_CURSOR)
    for file_type in (io.TextIOWrapper, io.BufferedReader, io.BufferedWriter, io.BufferedRandom):
        register_builtin_adapter(file_type, _reduce_file, kind="value")
    register_builtin_adapter(io.FileIO, _reduce_file, kind="value")
    register_builtin_adapter(_thread.LockType, _REFUSE_LOCK)
    register_builtin_adapter(_thread.RLock, _REFUSE_LOCK)
    register_builtin_adapter("multiprocessing.synchronize.SemLock", _REFUSE_MULTIPROCESSING_LOCK)
    register_builtin_adapter("_queue.SimpleQueue", _REFUSE_SIMPLE_QUEUE)
    register_builtin_adapter("_socket.socket", _REFUSE_SOCKET)
    register_builtin_adapter("mmap.mmap", _REFUSE_MMAP)
    for hash_type in _hash_types():
        register_builtin_adapter(hash_type, _REFUSE_HASH)
