"""procession-duckdb against real DuckDB database files, through real worker processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest
from procession_duckdb import database_of, reduce_connection

import procession
from procession import SerializationError
from procession.serialization.adapters import find_adapter, find_reducer

# Tasks are defined inside the tests (sent by value): the workers cannot
# import this test module.


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "sales.duckdb"
    con = duckdb.connect(str(path))
    con.execute("create table sales(k integer, amount double)")
    con.execute("insert into sales select i, i * 1.5 from range(50) t(i)")
    con.close()
    return path


@pytest.fixture
def readonly(db_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    con = duckdb.connect(str(db_path), read_only=True)
    yield con
    con.close()


def test_registered_through_the_entry_point() -> None:
    assert find_reducer(type(duckdb.connect())) is reduce_connection
    adapter = find_adapter(type(duckdb.connect()))
    assert adapter is not None and adapter.kind == "resource"


def test_database_path_comes_from_duckdb(
    db_path: Path, readonly: duckdb.DuckDBPyConnection
) -> None:
    assert database_of(readonly) == (str(db_path), True)
    assert database_of(duckdb.connect()) == (None, False)


@pytest.mark.parametrize("backend", ["process", "threads"])
def test_connection_is_reopened_read_only_once_per_worker(
    db_path: Path, readonly: duckdb.DuckDBPyConnection, backend: str
) -> None:
    path = str(db_path)

    def lookup(k: int, con: duckdb.DuckDBPyConnection = readonly) -> tuple[int, float, int]:
        from procession_duckdb import open_read_only

        from procession.serialization.recipes import Recipe, build_count

        # A cursor per call: the worker's one connection may serve several threads.
        (amount,) = con.cursor().execute("select amount from sales where k = ?", [k]).fetchone()
        return os.getpid(), amount, build_count(Recipe(open_read_only, path))

    rows = list(procession.map(lookup, range(50), backend=backend, chunksize=4))
    assert [amount for _, amount, _ in rows] == [k * 1.5 for k in range(50)]
    assert {count for _, _, count in rows} == {1}
    if backend == "process":
        assert os.getpid() not in {pid for pid, _, _ in rows}


def test_workers_cannot_write(readonly: duckdb.DuckDBPyConnection) -> None:
    def write(_: int, con: duckdb.DuckDBPyConnection = readonly) -> None:
        con.cursor().execute("insert into sales values (999, 0)")

    with pytest.raises(duckdb.Error, match="read-only"):
        list(procession.map(write, [0], backend="process"))


def test_in_memory_database_is_refused_with_advice() -> None:
    con = duckdb.connect()
    with pytest.raises(SerializationError, match="in-memory DuckDB database") as info:
        procession.check_picklable(con)
    assert "duckdb.connect('data.duckdb')" in str(info.value)
    with pytest.raises(SerializationError, match="in-memory"):
        list(procession.map(lambda i, con=con: i, range(2), backend="process"))


def test_read_write_connection_is_refused_with_advice(db_path: Path) -> None:
    con = duckdb.connect(str(db_path))
    try:
        with pytest.raises(SerializationError, match="read-write") as info:
            procession.check_picklable(con)
        assert "read_only=True" in str(info.value)
    finally:
        con.close()


def test_pending_result_on_the_users_connection_is_untouched(
    readonly: duckdb.DuckDBPyConnection,
) -> None:
    readonly.execute("select 42")
    procession.check_picklable(readonly)
    assert readonly.fetchone() == (42,)
