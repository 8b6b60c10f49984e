"""Values with state vs resources (issue 12, part 1).

A *value with state* (an unstarted generator, a read-only file at a
position) must arrive in every task exactly as it was in the caller; a
*resource* (a Recipe, a sqlite3 connection) is built once per worker and
shared.  Unit tests of the adapter API and the tracker first, then both kinds
end to end on every process backend.
"""

from __future__ import annotations

import ast
import functools
import io
import os
import sqlite3
import subprocess
import sys
import threading
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import procession
from procession.serialization import get_serializer, registered_adapters
from procession.serialization.adapters import find_adapter, track_stateful_values

pytestmark = pytest.mark.timeout(120)

SERIALIZERS = ["pickle", "cloudpickle", "dill"]


def numbers(n: int) -> Iterator[int]:
    yield from range(n)


def sum_of(gen: Iterator[int], _x: int) -> int:
    return sum(gen)


def read_rest(handle: Any, _x: int) -> Any:
    return handle.read()


# -- the tracker ----------------------------------------------------------------


@pytest.mark.parametrize("serializer", SERIALIZERS)
def test_tracker_counts_values_with_state_under_every_serializer(
    serializer: str, tmp_path: Path
) -> None:
    path = tmp_path / "words.txt"
    path.write_text("alpha\nbeta\n")
    chosen = get_serializer(serializer)
    with open(path) as text, open(path, "rb") as binary:
        with track_stateful_values() as seen:
            chosen.dumps(functools.partial(sum_of, numbers(10)))
        assert seen.count == 1
        with track_stateful_values() as seen:
            chosen.dumps([text, binary, procession.Recipe(list, [1]).fresh()])
        assert seen.count == 3
    with track_stateful_values() as seen:
        chosen.dumps(functools.partial(sum_of, [1, 2, 3]))
        chosen.dumps(procession.Recipe(list, [1]))  # a resource
        chosen.dumps(procession.Recipe(list, [1]).per_thread())
    assert seen.count == 0


def test_tracker_counts_only_inside_the_block_and_nests() -> None:
    serializer = get_serializer("pickle")
    serializer.dumps(numbers(3))  # outside any block: nobody counts
    with track_stateful_values() as outer:
        serializer.dumps(numbers(3))
        with track_stateful_values() as inner:
            serializer.dumps([numbers(3), numbers(4)])
        serializer.dumps(numbers(3))
    serializer.dumps(numbers(3))
    assert (outer.count, inner.count) == (4, 2)
    assert repr(inner) == "StatefulValues(count=2)"


def test_tracker_is_per_thread() -> None:
    serializer = get_serializer("cloudpickle")
    other_done = threading.Event()

    def other() -> None:
        serializer.dumps([numbers(1), numbers(2)])
        other_done.set()

    with track_stateful_values() as seen:
        thread = threading.Thread(target=other)
        thread.start()
        assert other_done.wait(30)
        thread.join(30)
        serializer.dumps(numbers(5))
    assert seen.count == 1


def test_resources_are_not_counted(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "db.sqlite")
    try:
        with track_stateful_values() as seen:
            get_serializer("cloudpickle").dumps(functools.partial(sum_of, conn))
        assert seen.count == 0
    finally:
        conn.close()


# -- kinds in the adapter API ---------------------------------------------------


def test_builtin_adapters_declare_their_kind() -> None:
    values = [types.GeneratorType, io.TextIOWrapper, io.BufferedReader, io.FileIO]
    for cls in values:
        adapter = find_adapter(cls)
        assert adapter is not None and adapter.kind == "value", cls
    connection = find_adapter(sqlite3.Connection)
    assert connection is not None and connection.kind == "resource"
    assert find_adapter(int) is None


class Counter:
    """Unpicklable on purpose: it travels through an adapter."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __reduce__(self) -> Any:
        raise TypeError("cannot pickle 'Counter' object")


BUILT: list[int] = []


def rebuild_counter(start: int) -> Counter:
    BUILT.append(start)
    return Counter(start)


def reduce_counter(counter: Counter) -> procession.Recipe[Counter]:
    # A process-scoped Recipe: kind="value" must override that scope.
    return procession.Recipe(rebuild_counter, counter.start)


@pytest.fixture
def registered() -> Iterator[Callable[..., None]]:
    """Register adapters for one test; unregister them afterwards."""
    done: list[Any] = []

    def register(type_: Any, reduce: Any, **kind: Any) -> None:
        procession.register_adapter(type_, reduce, **kind)
        done.append(type_)

    yield register
    for type_ in done:
        procession.unregister_adapter(type_)


def test_value_adapter_is_rebuilt_on_every_unpickle(registered: Callable[..., None]) -> None:
    registered(Counter, reduce_counter, kind="value")
    serializer = get_serializer("pickle")
    with track_stateful_values() as seen:
        data = serializer.dumps(Counter(7))
    assert seen.count == 1
    BUILT.clear()
    first, second = serializer.loads(data), serializer.loads(data)
    assert first is not second and BUILT == [7, 7]


def test_resource_adapter_is_built_once_per_process(registered: Callable[..., None]) -> None:
    registered(Counter, reduce_counter)  # the default kind is "resource"
    adapter = find_adapter(Counter)
    assert adapter is not None and adapter.kind == "resource"
    serializer = get_serializer("pickle")
    start = int(uuid.uuid4().int % 10**9)  # a Recipe no earlier test built
    with track_stateful_values() as seen:
        data = serializer.dumps(Counter(start))
    assert seen.count == 0
    BUILT.clear()
    assert serializer.loads(data) is serializer.loads(data)
    assert [start] == BUILT


def test_kind_is_validated_and_a_changed_kind_is_a_conflict(
    registered: Callable[..., None],
) -> None:
    with pytest.raises(ValueError, match=r"kind must be 'resource'.*or 'value'"):
        procession.register_adapter(Counter, reduce_counter, kind="state")  # type: ignore[arg-type]
    assert find_adapter(Counter) is None
    registered(Counter, reduce_counter, kind="value")
    procession.register_adapter(Counter, reduce_counter, kind="value")  # the same: harmless
    with pytest.raises(ValueError, match=r"already registered.*unregister_adapter"):
        procession.register_adapter(Counter, reduce_counter, kind="resource")


# -- unregister_adapter -----------------------------------------------------------


def test_unregister_adapter_removes_it() -> None:
    assert "unregister_adapter" in procession.__all__
    procession.register_adapter(Counter, reduce_counter)
    assert Counter in registered_adapters()
    procession.unregister_adapter(Counter)
    assert Counter not in registered_adapters()
    assert find_adapter(Counter) is None
    with pytest.raises(procession.SerializationError):
        procession.check_picklable(Counter(1), "pickle")
    with pytest.raises(LookupError, match=r"Counter: it has no adapter registered"):
        procession.unregister_adapter(Counter)


def test_unregister_names_the_key_it_was_registered_under() -> None:
    name = f"{Counter.__module__}.{Counter.__qualname__}"
    procession.register_adapter(name, reduce_counter)
    try:
        with pytest.raises(LookupError, match=f"one under {name!r}"):
            procession.unregister_adapter(Counter)
    finally:
        procession.unregister_adapter(name)
    assert find_adapter(Counter) is None
    with pytest.raises(ValueError, match="QualName"):
        procession.unregister_adapter("nodots")


def fresh_list(gen: Iterator[int]) -> procession.Recipe[list[int]]:
    return procession.Recipe(list, [-1])


def test_unregistering_a_replacement_brings_the_builtin_back() -> None:
    builtin = find_adapter(types.GeneratorType)
    assert builtin is not None
    with pytest.raises(LookupError, match="built-in adapter"):
        procession.unregister_adapter(types.GeneratorType)
    procession.register_adapter(types.GeneratorType, fresh_list, kind="value")
    try:
        serializer = get_serializer("pickle")
        assert serializer.loads(serializer.dumps(numbers(3))) == [-1]
    finally:
        procession.unregister_adapter(types.GeneratorType)
    assert find_adapter(types.GeneratorType) == builtin
    assert list(serializer.loads(serializer.dumps(numbers(3)))) == [0, 1, 2]


def test_conformance_suite_leaves_the_registry_as_it_found_it() -> None:
    from procession.testing import BackendConformance, _tasks

    suite = BackendConformance()
    before = registered_adapters()
    suite.test_adapters_are_applied("serial")
    assert registered_adapters() == before
    assert find_adapter(_tasks.OpaqueHandle) is None
    # A host that registered the adapter itself keeps it.
    procession.register_adapter(_tasks.OpaqueHandle, _tasks.reduce_opaque_handle)
    try:
        suite.test_adapters_are_applied("serial")
        assert find_adapter(_tasks.OpaqueHandle) is not None
    finally:
        procession.unregister_adapter(_tasks.OpaqueHandle)


# -- module structure -------------------------------------------------------------


def _top_level_imports(path: Path) -> set[str]:
    """procession modules that ``path`` imports when it is imported (not lazily)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` imports nothing at run time
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("procession"):
                for alias in node.names:
                    candidate = f"{node.module}.{alias.name}"
                    module_path = Path(*candidate.split(".")).with_suffix(".py")
                    exists = (SRC / module_path).exists()
                    found.add(candidate if exists else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("procession")}
    return found


SRC = Path(procession.__file__).parent.parent
SERIALIZATION = SRC / "procession" / "serialization"


def test_rebuild_and_leaf_modules_import_nothing_upward() -> None:
    assert _top_level_imports(SERIALIZATION / "_cache.py") == set()
    assert _top_level_imports(SERIALIZATION / "_tracking.py") == set()
    # _rebuild (whose names live inside pickles) may import leaf modules only:
    # ones that import nothing from procession themselves.
    imported = _top_level_imports(SERIALIZATION / "_rebuild.py")
    assert "procession.serialization._cache" in imported
    for module in imported:
        path = SRC / Path(*module.split(".")).with_suffix(".py")
        assert path.exists(), f"_rebuild imports the package {module}, not a leaf module"
        assert _top_level_imports(path) == set(), f"_rebuild imports {module}, not a leaf"


def test_serialization_modules_import_without_a_cycle() -> None:
    graph = {
        f"procession.serialization.{path.stem}": {
            target
            for target in _top_level_imports(path)
            if target.startswith("procession.serialization.")
        }
        for path in SERIALIZATION.glob("*.py")
        if path.stem != "__init__"
    }
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        assert module not in visiting, f"import cycle: {' -> '.join([*visiting, module])}"
        if module in done:
            return
        visiting.append(module)
        for target in graph.get(module, ()):
            visit(target)
        visiting.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_forked_child_starts_with_no_built_recipes() -> None:
    script = (
        "import os, procession\n"
        "from procession.serialization import build_count, get_serializer\n"
        "r = procession.Recipe(list, [1, 2])\n"
        "s = get_serializer('pickle')\n"
        "s.loads(s.dumps(r))\n"
        "assert build_count(r) == 1\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(0 if build_count(r) == 0 else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "raise SystemExit(os.waitstatus_to_exitcode(status))\n"
    )
    if not hasattr(os, "fork"):
        pytest.skip("no os.fork on this platform")
    done = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()


# -- end to end, on every process backend ------------------------------------------


@pytest.mark.parametrize("chunksize", [1, 4])
def test_generator_in_a_partial_reaches_every_task(backend_name: str, chunksize: int) -> None:
    # Every backend, not only process ones: serial and threads decode the
    # function through the same worker runtime (and its cache).
    fn = functools.partial(sum_of, numbers(10))
    for _ in range(2):  # a second map must not see the first one's generator either
        out = list(procession.map(fn, range(4), backend=backend_name, chunksize=chunksize))
        assert out == [45] * 4
    assert list(fn.args[0]) == list(range(10))  # the caller's generator was not consumed


@pytest.mark.parametrize("mode", ["r", "rb"])
def test_read_only_file_in_a_partial_gives_every_task_the_same_text(
    process_backend_name: str, tmp_path: Path, mode: str
) -> None:
    path = tmp_path / "words.txt"
    path.write_bytes(b"alpha\nbeta\ngamma\n")
    with open(path, mode) as handle:
        handle.readline()  # the tasks start where the caller's file object is
        fn = functools.partial(read_rest, handle)
        for chunksize in (1, 4):
            out = list(
                procession.map(fn, range(4), backend=process_backend_name, chunksize=chunksize)
            )
            expected = "beta\ngamma\n" if mode == "r" else b"beta\ngamma\n"
            assert out == [expected] * 4
        assert handle.read() == expected  # the caller's file did not move


# Builds of each probe, in the process that built it (a worker).
PROBE_BUILDS: dict[str, int] = {}


def make_probe(nonce: str) -> str:
    PROBE_BUILDS[nonce] = PROBE_BUILDS.get(nonce, 0) + 1
    return nonce


def builds_of(probe: str, gen: Iterator[int], _x: int) -> tuple[int, int, int]:
    return os.getpid(), PROBE_BUILDS[probe], sum(gen)


def test_resource_built_once_per_worker_next_to_a_value(process_backend_name: str) -> None:
    recipe: Any = procession.Recipe(make_probe, uuid.uuid4().hex)
    fn = functools.partial(builds_of, recipe, numbers(10))
    rows = list(procession.map(fn, range(12), backend=process_backend_name, chunksize=1))
    rows += list(procession.map(fn, range(12), backend=process_backend_name, chunksize=3))
    assert [total for _, _, total in rows] == [45] * 24
    assert os.getpid() not in {pid for pid, _, _ in rows}
    assert {builds for _, builds, _ in rows} == {1}, "a worker built the Recipe twice"


def connection_of(conn: sqlite3.Connection, _x: int) -> tuple[int, int, int, int]:
    (rows,) = conn.execute("select count(*) from t").fetchone()
    return os.getpid(), threading.get_ident(), id(conn), rows


def test_sqlite_connection_is_a_resource_per_worker(
    process_backend_name: str, tmp_path: Path
) -> None:
    conn = sqlite3.connect(tmp_path / "db.sqlite")
    try:
        conn.execute("create table t(x)")
        conn.executemany("insert into t values (?)", [(i,) for i in range(5)])
        conn.commit()
        fn = functools.partial(connection_of, conn)
        rows = list(procession.map(fn, range(12), backend=process_backend_name, chunksize=1))
        rows += list(procession.map(fn, range(8), backend=process_backend_name, chunksize=4))
    finally:
        conn.close()
    assert [count for *_, count in rows] == [5] * 20
    connections: dict[tuple[int, int], set[int]] = {}
    for pid, thread, conn_id, _ in rows:
        connections.setdefault((pid, thread), set()).add(conn_id)
    assert all(len(ids) == 1 for ids in connections.values()), connections


def total(gen: Iterator[int]) -> int:
    return sum(gen)


@pytest.mark.parametrize("chunksize", [1, 4])
def test_generators_as_items(process_backend_name: str, chunksize: int) -> None:
    items = [numbers(n) for n in range(8)]
    out = list(procession.map(total, items, backend=process_backend_name, chunksize=chunksize))
    assert out == [n * (n - 1) // 2 for n in range(8)]
    # The caller's generators are untouched.
    assert [list(gen) for gen in items[:3]] == [[], [0], [0, 1]]
    # One generator as four items, one task each: every task gets it unstarted.
    gen = numbers(5)
    out = list(procession.map(total, [gen] * 4, backend=process_backend_name, chunksize=1))
    assert out == [10] * 4
    # ... and in one chunk of four: each item still gets it unstarted.
    out = list(procession.map(total, [gen] * 4, backend=process_backend_name, chunksize=4))
    assert out == [10] * 4
