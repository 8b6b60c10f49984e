"""procession adapter for DuckDB: send connections to a database file to workers.

A ``duckdb.DuckDBPyConnection`` cannot be pickled.  With this plug-in
installed, a connection to a database *file* travels as a
:class:`procession.Recipe`: "connect to this file, read-only".  Each worker
connects once and reuses the connection for every later task on it.

Example::

    con = duckdb.connect("sales.duckdb", read_only=True)
    totals = procession.map(
        lambda region, con=con: con.execute(
            "select sum(amount) from sales where region = ?", [region]).fetchone()[0],
        regions,
    )

The database path comes from DuckDB itself (``duckdb_databases()``, else
``PRAGMA database_list``).  Refused, with advice: in-memory databases (there
is no file for a worker to open) and read-write connections (DuckDB lets one
process hold a database file for writing, so no worker could open it while
this connection is open).

Registration names the connection type by module and name, so DuckDB is
imported only when a connection is actually sent.
"""

from __future__ import annotations

from typing import Any

import procession
from procession import Recipe, SerializationError

__all__ = ["database_of", "open_read_only", "register_adapters"]

# DuckDB 1.x defines the class in duckdb.duckdb, 2.x in _duckdb.
_CONNECTION_TYPES = ("_duckdb.DuckDBPyConnection", "duckdb.duckdb.DuckDBPyConnection")


def open_read_only(path: str) -> Any:
    """Connect to ``path`` read-only (the factory workers call; cached per worker)."""
    import duckdb

    return duckdb.connect(path, read_only=True)


def database_of(con: Any) -> tuple[str | None, bool | None]:
    """``(path, read_only)`` of the connection's current database, asked of DuckDB.

    ``path`` is None for an in-memory database; ``read_only`` is None when
    this DuckDB cannot say.
    """
    # A cursor is a second handle on the same database: querying it leaves any
    # result pending on the user's connection untouched.
    cursor = con.cursor()
    try:
        try:
            row = cursor.execute(
                "select path, readonly from duckdb_databases() "
                "where database_name = current_database()"
            ).fetchone()
        except Exception:  # an older DuckDB: no duckdb_databases().readonly
            row = None
        if row is not None:
            return (row[0] or None), bool(row[1])
        (name,) = cursor.execute("select current_database()").fetchone()
        for _seq, db_name, file in cursor.execute("PRAGMA database_list").fetchall():
            if db_name == name:
                return (file or None), None
        return None, None
    finally:
        cursor.close()


def _refuse(reason: str) -> SerializationError:
    return SerializationError(reason, type_name="duckdb.DuckDBPyConnection")


def reduce_connection(con: Any) -> Recipe[Any]:
    """A connection to a database file: reconnect read-only in the worker."""
    try:
        path, read_only = database_of(con)
    except Exception as exc:  # closed connection, or DuckDB refused the query
        raise _refuse(
            f"cannot send a DuckDB connection whose database cannot be read "
            f"({type(exc).__name__}: {exc}); send an open connection or the database path"
        ) from exc
    if path is None or path == ":memory:":
        raise _refuse(
            "cannot send a connection to an in-memory DuckDB database: workers have no file "
            "to open; write it to a file (duckdb.connect('data.duckdb')), or create the data "
            "in each worker with procession.Recipe(factory, ...)"
        )
    if read_only is False:
        raise _refuse(
            f"cannot send a read-write DuckDB connection to {path!r}: while it is open, DuckDB "
            f"locks the file and no worker can open it; close it and send "
            f"duckdb.connect({path!r}, read_only=True) instead"
        )
    return Recipe(open_read_only, path)


def register_adapters() -> None:
    """Entry-point hook (group ``procession.adapters``): register the DuckDB adapter."""
    # A resource: one read-only connection per worker, shared by its tasks.
    for name in _CONNECTION_TYPES:
        procession.register_adapter(name, reduce_connection, kind="resource")
