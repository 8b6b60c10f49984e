"""Adapters: the built-ins (generators, sqlite3, files, refusals) and plug-ins, end to end."""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import socket
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _serialization_helpers import LOCAL_BACKENDS, LOCAL_PROCESS_BACKENDS

import procession
from procession.serialization import get_serializer, registered_adapters
from procession.serialization.policy import current_policy, policy, snapshot

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=LOCAL_BACKENDS)
def local_backend(request: pytest.FixtureRequest) -> str:
    """Every usable local backend (see _serialization_helpers for why not remote ones)."""
    return str(request.param)


@pytest.fixture(params=LOCAL_PROCESS_BACKENDS)
def local_process_backend(request: pytest.FixtureRequest) -> str:
    """Every usable local backend with isolated worker processes."""
    return str(request.param)


# -- generators ---------------------------------------------------------------


def count(n: int, *, step: int = 1) -> Iterator[int]:
    yield from range(0, n, step)


def spread(first: int, *rest: int, scale: int = 1, **named: int) -> Iterator[int]:
    yield first * scale
    for value in rest:
        yield value * scale
    yield from named.values()


def total(numbers: Iterator[int]) -> int:
    return sum(numbers)


def make_nested_generator(offset: int) -> Iterator[int]:
    def shifted(n: int) -> Iterator[int]:
        for i in range(n):
            yield i + offset

    return shifted(3)


def test_unstarted_generators_are_rebuilt_in_the_worker(local_backend: str) -> None:
    gens = [count(5), count(10, step=3), spread(1, 2, 3, scale=10, extra=7)]
    out = list(procession.map(total, gens, backend=local_backend, serializer="pickle"))
    assert out == [10, 0 + 3 + 6 + 9, 10 + 20 + 30 + 7]
    # The caller's generators were not consumed.
    assert list(gens[0]) == [0, 1, 2, 3, 4]


def test_each_task_gets_a_fresh_generator(local_backend: str) -> None:
    gen = count(4)
    out = list(procession.map(total, [gen] * 5, backend=local_backend, chunksize=1))
    assert out == [6] * 5


def test_closures_and_generator_expressions_with_cloudpickle(local_backend: str) -> None:
    squares = (x * x for x in range(4))
    out = list(
        procession.map(
            total,
            [make_nested_generator(10), squares],
            backend=local_backend,
            serializer="cloudpickle",
        )
    )
    assert out == [10 + 11 + 12, 0 + 1 + 4 + 9]


def test_nested_generator_function_with_pickle_suggests_cloudpickle() -> None:
    with pytest.raises(procession.SerializationError) as info:
        procession.check_picklable({"g": make_nested_generator(1)}, "pickle")
    assert info.value.path.startswith("obj['g']")
    assert 'serializer="cloudpickle"' in str(info.value)


def test_started_generator_is_refused_by_default(local_backend: str) -> None:
    gen = count(5)
    next(gen)
    with pytest.raises(procession.SerializationError) as info:
        list(procession.map(total, [[1], gen], backend=local_backend))
    error = info.value
    assert error.index == 1
    assert error.path == "item"
    assert "already started" in str(error)
    assert 'started_generators="drain"' in str(error)
    done = count(1)
    list(done)
    with pytest.raises(procession.SerializationError, match="exhausted"):
        procession.check_picklable(done)


def test_started_generator_drained_by_policy(local_backend: str) -> None:
    gen = count(5)
    next(gen)
    assert current_policy().started_generators == "refuse"
    with policy(started_generators="drain") as chosen:
        assert chosen.started_generators == "drain"
        # The same generator twice: both tasks see the same drained items.
        out = list(procession.map(total, [gen, gen], backend=local_backend, chunksize=1))
    assert out == [1 + 2 + 3 + 4] * 2
    assert current_policy().started_generators == "refuse"
    with (
        pytest.raises(ValueError, match="started_generators"),
        policy(started_generators="maybe"),  # type: ignore[arg-type]
    ):
        pass


# -- sqlite3 ------------------------------------------------------------------


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "data base.sqlite"  # a space: the URI must be quoted
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE squares (n INTEGER PRIMARY KEY, square INTEGER)")
    conn.executemany("INSERT INTO squares VALUES (?, ?)", [(n, n * n) for n in range(50)])
    conn.commit()
    conn.close()
    return path


def lookup(conn: sqlite3.Connection, n: int) -> tuple[int, int, int, int]:
    (square,) = conn.execute("SELECT square FROM squares WHERE n = ?", (n,)).fetchone()
    return square, os.getpid(), threading.get_ident(), id(conn)


def try_write(conn: sqlite3.Connection, n: int) -> str:
    try:
        conn.execute("INSERT INTO squares VALUES (?, ?)", (1000 + n, 0))
    except sqlite3.OperationalError as exc:
        return str(exc)
    finally:
        conn.rollback()
    return "written"


def named_square(conn: sqlite3.Connection, n: int) -> int:
    row = conn.execute("SELECT square FROM squares WHERE n = ?", (n,)).fetchone()
    return int(row["square"])


def test_sqlite_file_database_queried_from_process_workers(
    local_process_backend: str, database: Path
) -> None:
    conn = sqlite3.connect(database)
    try:
        task = functools.partial(lookup, conn)
        for _ in range(2):  # a second map reuses each worker's connection
            out = list(
                procession.map(
                    task, range(50), backend=local_process_backend, workers=2, serializer="pickle"
                )
            )
            assert [square for square, *_ in out] == [n * n for n in range(50)]
        assert os.getpid() not in {pid for _, pid, _, _ in out}
        connections: dict[int, set[int]] = {}
        for _, pid, _, conn_id in out:
            connections.setdefault(pid, set()).add(conn_id)
        assert all(len(ids) == 1 for ids in connections.values())
    finally:
        conn.close()


def lookup_pair(pair: tuple[sqlite3.Connection, int]) -> tuple[int, int, int, int]:
    return lookup(*pair)


@pytest.mark.parametrize("backend", ["serial", "threads"])
def test_sqlite_in_process_backends_get_a_connection_per_thread(
    backend: str, database: Path
) -> None:
    # check_same_thread: each worker thread gets its own connection.
    conn = sqlite3.connect(database)
    try:
        pairs = [(conn, n) for n in range(40)]
        workers = 1 if backend == "serial" else 3
        out = list(
            procession.map(lookup_pair, pairs, backend=backend, workers=workers, chunksize=1)
        )
        assert [square for square, *_ in out] == [n * n for n in range(40)]
        per_thread: dict[int, set[int]] = {}
        for _, _, thread, conn_id in out:
            per_thread.setdefault(thread, set()).add(conn_id)
        assert all(len(ids) == 1 for ids in per_thread.values())
        assert id(conn) not in {conn_id for *_, conn_id in out}
        # Inside the mapped function the connection is decoded once per process
        # and shared by the threads (SQLite's serialized mode makes that safe).
        task = functools.partial(lookup, conn)
        out = list(procession.map(task, range(40), backend=backend, workers=workers, chunksize=1))
        assert [square for square, *_ in out] == [n * n for n in range(40)]
    finally:
        conn.close()


def test_sqlite_read_only_flag_and_row_factory_are_kept(local_backend: str, database: Path) -> None:
    readonly = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    writable = sqlite3.connect(database)
    writable.row_factory = sqlite3.Row
    try:
        refused = list(
            procession.map(functools.partial(try_write, readonly), [1], backend=local_backend)
        )
        assert "readonly" in refused[0]
        allowed = list(
            procession.map(functools.partial(try_write, writable), [2], backend=local_backend)
        )
        assert allowed == ["written"]
        named = list(
            procession.map(functools.partial(named_square, writable), [7], backend=local_backend)
        )
        assert named == [49]
    finally:
        readonly.close()
        writable.close()


def test_sqlite_attached_database_is_reattached(tmp_path: Path, database: Path) -> None:
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as setup:
        setup.execute("CREATE TABLE words (w TEXT)")
        setup.execute("INSERT INTO words VALUES ('hello')")
    setup.close()
    conn = sqlite3.connect(database)
    try:
        conn.execute("ATTACH DATABASE ? AS extra", (str(other),))
        rebuilt = get_serializer("pickle").loads(get_serializer("pickle").dumps(conn))
        try:
            assert rebuilt.execute("SELECT w FROM extra.words").fetchall() == [("hello",)]
        finally:
            rebuilt.close()
    finally:
        conn.close()


def count_rows(conn: sqlite3.Connection, table: str) -> int:
    return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def test_sqlite_memory_database_refused_unless_snapshot(local_backend: str) -> None:
    mem = sqlite3.connect(":memory:")
    try:
        mem.execute("CREATE TABLE t (x)")
        mem.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(7)])
        mem.commit()
        task = functools.partial(count_rows, mem)
        with pytest.raises(procession.SerializationError) as info:
            list(procession.map(task, ["t"], backend=local_backend))
        assert "in-memory" in str(info.value)
        assert 'memory_databases="snapshot"' in str(info.value)
        assert info.value.path == "fn.args[0]"
        with policy(memory_databases="snapshot"):
            assert list(procession.map(task, ["t", "t"], backend=local_backend)) == [7, 7]
        explicit = functools.partial(count_rows, snapshot(mem))
        assert list(procession.map(explicit, ["t"], backend=local_backend)) == [7]
    finally:
        mem.close()


def test_sqlite_uncommitted_and_closed_connections_are_refused(database: Path) -> None:
    conn = sqlite3.connect(database)
    conn.execute("INSERT INTO squares VALUES (999, 0)")
    with pytest.raises(procession.SerializationError, match="commit"):
        procession.check_picklable(conn)
    conn.rollback()
    procession.check_picklable(conn)
    conn.close()
    with pytest.raises(procession.SerializationError, match="cannot be used"):
        procession.check_picklable(conn)


def test_sqlite_cursor_is_refused_with_advice(database: Path) -> None:
    conn = sqlite3.connect(database)
    try:
        with pytest.raises(procession.SerializationError, match="cursor"):
            procession.check_picklable([conn.cursor()], "pickle")
    finally:
        conn.close()


# -- files --------------------------------------------------------------------


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"line {i} é\n" for i in range(20)), encoding="utf-8")
    return path


def read_two(handle: Any) -> list[Any]:
    with handle:
        return [handle.readline(), handle.readline()]


def test_read_only_text_file_reopened_at_same_position(local_backend: str, text_file: Path) -> None:
    with open(text_file, encoding="utf-8") as handle:
        handle.readline()
        handle.readline()
        out = list(procession.map(read_two, [handle, handle], backend=local_backend, chunksize=1))
        # Each task got its own handle at the sender's position; ours did not move.
        assert out == [["line 2 é\n", "line 3 é\n"]] * 2
        assert handle.readline() == "line 2 é\n"


def test_read_only_binary_files_reopened(local_backend: str, text_file: Path) -> None:
    with open(text_file, "rb") as buffered, open(text_file, "rb", buffering=0) as raw:
        buffered.read(4)
        raw.read(5)
        out = list(procession.map(read_two, [buffered, raw], backend=local_backend))
    assert out[0][0] == b" 0 \xc3\xa9\n"
    assert out[1][0] == b"0 \xc3\xa9\n"


def test_write_mode_closed_and_iterated_files_are_refused(tmp_path: Path, text_file: Path) -> None:
    with (
        open(tmp_path / "out.txt", "w") as handle,
        pytest.raises(procession.SerializationError, match="writing"),
    ):
        procession.check_picklable({"out": handle})
    with (
        open(text_file, "r+") as handle,
        pytest.raises(procession.SerializationError, match="writing"),
    ):
        procession.check_picklable(handle)
    closed = open(text_file)  # noqa: SIM115
    closed.close()
    with pytest.raises(procession.SerializationError, match="closed"):
        procession.check_picklable(closed)
    with open(text_file) as handle:
        next(iter(handle))
        with pytest.raises(procession.SerializationError, match="tell"):
            procession.check_picklable(handle)


# -- refusals -----------------------------------------------------------------


@pytest.mark.parametrize("serializer", ["pickle", "cloudpickle", "dill"])
def test_process_bound_objects_are_refused_with_advice(serializer: str) -> None:
    sock = socket.socket()
    try:
        cases: list[tuple[Any, str]] = [
            (threading.Lock(), "Manager"),
            (threading.RLock(), "Recipe"),
            (hashlib.sha256(b"x"), "hexdigest"),
            (hashlib.blake2b(), "hexdigest"),
            (sock, "create_connection"),
        ]
        for obj, advice in cases:
            with pytest.raises(procession.SerializationError) as info:
                procession.check_picklable({"x": [obj]}, serializer)
            assert info.value.path == "obj['x'][0]"
            assert advice in str(info.value)
            assert serializer in str(info.value)
    finally:
        sock.close()


def test_multiprocessing_lock_refused_without_importing_on_lookup() -> None:
    import multiprocessing

    lock = multiprocessing.get_context("spawn").Lock()
    with pytest.raises(procession.SerializationError, match="Manager"):
        procession.check_picklable(lock, "pickle")


# -- plug-ins and user adapters ------------------------------------------------


def handle_name(handle: Any) -> str:
    return f"{type(handle).__name__}:{handle.name}"


def test_entry_point_adapter_from_installed_distribution(local_backend: str) -> None:
    from procession_example_backend import Handle

    with pytest.raises(TypeError):
        pickle.dumps(Handle("raw"))
    assert Handle in registered_adapters()
    out = list(
        procession.map(
            handle_name, [Handle("a"), Handle("b")], backend=local_backend, serializer="pickle"
        )
    )
    assert out == ["Handle:a", "Handle:b"]


class Gadget:
    """Refuses to pickle; a user adapter sends it by its settings."""

    def __init__(self, setting: int) -> None:
        self.setting = setting
        self._lock = threading.Lock()


def rebuild_gadget(setting: int) -> Gadget:
    return Gadget(setting)


def reduce_gadget(gadget: Gadget) -> procession.Recipe[Gadget]:
    return procession.Recipe(rebuild_gadget, gadget.setting)


class Widget(Gadget):
    """Covered by the adapter registered by name for its base class."""


class NamedThing:
    def __init__(self) -> None:
        self._lock = threading.Lock()


def reduce_named(_: NamedThing) -> procession.Recipe[str]:
    return procession.Recipe(str, "named")


def setting_of(gadget: Gadget) -> int:
    return gadget.setting


@pytest.fixture
def scoped_adapters() -> Iterator[list[Any]]:
    """Types a test registers adapters for (append them): unregistered afterwards,
    so no test leaves a global adapter behind for the next."""
    registered: list[Any] = []
    yield registered
    for type_ in registered:
        procession.unregister_adapter(type_)


def test_user_adapter_applies_under_every_serializer(
    local_backend: str, scoped_adapters: list[Any]
) -> None:
    procession.register_adapter(Gadget, reduce_gadget)
    scoped_adapters.append(Gadget)
    procession.register_adapter(Gadget, reduce_gadget)  # the same twice: harmless
    with pytest.raises(ValueError, match="already registered"):
        procession.register_adapter(Gadget, lambda g: procession.Recipe(rebuild_gadget, 0))
    for serializer in ["pickle", "cloudpickle", "dill"]:
        out = list(
            procession.map(
                setting_of, [Gadget(4), Widget(5)], backend=local_backend, serializer=serializer
            )
        )
        assert out == [4, 5]


def test_adapter_registered_by_type_name(scoped_adapters: list[Any]) -> None:
    procession.register_adapter(f"{__name__}.NamedThing", reduce_named)
    scoped_adapters.append(f"{__name__}.NamedThing")
    serializer = get_serializer("pickle")
    assert serializer.loads(serializer.dumps(NamedThing())) == "named"
    with pytest.raises(ValueError, match="QualName"):
        procession.register_adapter("nodots", reduce_named)
    with pytest.raises(TypeError):
        procession.register_adapter(3, reduce_named)  # type: ignore[arg-type]


def not_a_recipe(_: Any) -> Any:
    return "not a recipe"


class Odd:
    pass


def test_adapter_must_return_a_recipe(scoped_adapters: list[Any]) -> None:
    procession.register_adapter(Odd, not_a_recipe)
    scoped_adapters.append(Odd)
    with pytest.raises(procession.SerializationError, match=r"not a procession\.Recipe"):
        procession.check_picklable(Odd(), "pickle")


class Fragile:
    pass


def broken_reduce(_: Fragile) -> procession.Recipe[Fragile]:
    raise ValueError("adapter bug")


def test_failing_adapter_is_named_in_the_error(scoped_adapters: list[Any]) -> None:
    procession.register_adapter(Fragile, broken_reduce)
    scoped_adapters.append(Fragile)
    with pytest.raises(procession.SerializationError) as info:
        procession.check_picklable({"f": Fragile()}, "cloudpickle")
    message = str(info.value)
    assert info.value.path == "obj['f']"
    assert "ValueError: adapter bug" in message
    assert "broken_reduce" in message
