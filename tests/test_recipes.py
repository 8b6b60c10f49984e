"""Recipes: identity, scopes, and built exactly once per worker across maps."""

from __future__ import annotations

import functools
import os
import re
import threading
import time
from pathlib import Path

import pytest
from _backend_helpers import workers_up_to
from _serialization_helpers import LOCAL_BACKENDS

import procession
from procession.serialization import get_serializer
from procession.serialization.recipes import build_count

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=LOCAL_BACKENDS)
def local_backend(request: pytest.FixtureRequest) -> str:
    """Every usable local backend (see _serialization_helpers for why not remote ones)."""
    return str(request.param)


class Expensive:
    """Stands for a costly object; records each build in a log file."""

    def __init__(self, log: str, label: str, delay: float = 0.0) -> None:
        time.sleep(delay)
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()} {threading.get_ident()} {label}\n")
        self.label = label
        self.token = object()


def make_expensive(log: str, label: str, delay: float = 0.0) -> Expensive:
    return Expensive(log, label, delay)


def use(thing: Expensive, x: int) -> tuple[int, int, str, int]:
    # id() of the built object: the same object is reused by every task in a worker.
    return os.getpid(), id(thing), thing.label, x


def builds(log: Path) -> list[tuple[int, int]]:
    if not log.exists():
        return []
    return [
        (int(pid), int(thread))
        for pid, thread, _ in (line.split() for line in log.read_text().splitlines())
    ]


def test_equal_recipes_share_a_key_and_kwargs_order_does_not_matter() -> None:
    a = procession.Recipe(make_expensive, "log", "a", delay=0.0)
    b = procession.Recipe(make_expensive, "log", "a", delay=0.0)
    c = procession.Recipe(make_expensive, "log", "c")
    assert a == b
    assert hash(a) == hash(b)
    assert a != c
    assert procession.Recipe(dict, x=1, y=2) == procession.Recipe(dict, y=2, x=1)
    assert a.per_thread() != a
    assert a.per_thread() == b.per_thread()
    assert "make_expensive" in repr(a)
    assert "with_scope('fresh')" in repr(a.fresh())


def test_recipe_rejects_non_callable_and_bad_scope() -> None:
    with pytest.raises(TypeError, match="callable factory"):
        procession.Recipe("not callable")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scope"):
        procession.Recipe(dict).with_scope("galaxy")  # type: ignore[arg-type]


@pytest.mark.parametrize("serializer", ["pickle", "cloudpickle", "dill"])
def test_unpickled_recipe_is_the_built_object_cached_in_process(
    serializer: str, tmp_path: Path
) -> None:
    log = tmp_path / "builds.log"
    recipe = procession.Recipe(make_expensive, str(log), serializer)
    chosen = get_serializer(serializer)
    first = chosen.loads(chosen.dumps({"thing": recipe}))["thing"]
    second = chosen.loads(chosen.dumps([recipe]))[0]
    assert isinstance(first, Expensive)
    assert first is second
    assert build_count(recipe) == 1
    assert len(builds(log)) == 1
    fresh = recipe.fresh()
    assert chosen.loads(chosen.dumps(fresh)) is not chosen.loads(chosen.dumps(fresh))
    assert len(builds(log)) == 3


def test_recipe_may_take_adapted_objects_as_arguments(tmp_path: Path) -> None:
    # The key is computed with the adapting serializer, so an unpicklable but
    # adapted argument (a file database connection) is fine.
    import sqlite3

    path = tmp_path / "db.sqlite"
    conn = sqlite3.connect(path)
    try:
        recipe = procession.Recipe(len, [conn])
        assert len(recipe.key) == 16
    finally:
        conn.close()


def test_per_thread_recipe_is_built_once_per_thread(tmp_path: Path) -> None:
    log = tmp_path / "builds.log"
    recipe = procession.Recipe(make_expensive, str(log), "t").per_thread()
    chosen = get_serializer("pickle")
    data = chosen.dumps(recipe)
    seen: list[int] = []
    # Keep all three threads alive together, so their idents are distinct.
    barrier = threading.Barrier(3, timeout=10)

    def load_twice() -> None:
        a, b = chosen.loads(data), chosen.loads(data)
        assert a is b
        seen.append(id(a))
        barrier.wait()

    threads = [threading.Thread(target=load_twice) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({thread for _, thread in builds(log)}) == 3
    assert len(builds(log)) == 3
    assert len(set(seen)) == 3


def test_process_recipe_is_built_once_when_threads_race(tmp_path: Path) -> None:
    log = tmp_path / "builds.log"
    recipe = procession.Recipe(make_expensive, str(log), "race", delay=0.05)
    results = list(
        procession.map(
            functools.partial(use, recipe), range(16), backend="threads", workers=4, chunksize=1
        )
    )
    assert len({object_id for _, object_id, _, _ in results}) == 1
    assert len(builds(log)) == 1


def test_recipe_built_once_per_worker_across_maps(local_backend: str, tmp_path: Path) -> None:
    log = tmp_path / "builds.log"
    recipe = procession.Recipe(make_expensive, str(log), local_backend, delay=0.01)
    task = functools.partial(use, recipe)
    seen: dict[int, set[int]] = {}
    for round_ in range(3):
        results = list(
            procession.map(
                task,
                range(12),
                backend=local_backend,
                workers=workers_up_to(local_backend, 2),
                chunksize=1,
            )
        )
        assert [x for _, _, _, x in results] == list(range(12)), round_
        assert {label for _, _, label, _ in results} == {local_backend}
        for pid, object_id, _, _ in results:
            seen.setdefault(pid, set()).add(object_id)
    logged = builds(log)
    pids = [pid for pid, _ in logged]
    # One build per worker process, whatever the number of tasks and maps.
    assert len(pids) == len(set(pids))
    assert set(pids) == set(seen)
    assert all(len(ids) == 1 for ids in seen.values())


def test_recipe_inside_an_argument_attribute(local_backend: str, tmp_path: Path) -> None:
    log = tmp_path / "builds.log"
    holder = Holder(procession.Recipe(make_expensive, str(log), "held"))
    out = list(procession.map(holder_label, [holder, holder, holder], backend=local_backend))
    assert out == ["held"] * 3


class Holder:
    def __init__(self, thing: object) -> None:
        self.thing = thing


def holder_label(holder: Holder) -> str:
    assert isinstance(holder.thing, Expensive)
    return holder.thing.label


@pytest.mark.timeout(90)
def test_expensive_objects_example_builds_once_per_worker() -> None:
    import subprocess
    import sys

    example = Path(__file__).resolve().parent.parent / "examples" / "expensive_objects.py"
    done = subprocess.run(
        [sys.executable, str(example), "--small", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "8 builds for 8 tasks" in done.stdout
    # One build per worker that took a task (the example itself checks "once each").
    assert re.search(r"\b[12] builds for 16 tasks", done.stdout), done.stdout
