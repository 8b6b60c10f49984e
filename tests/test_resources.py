"""Resource control in workers: memory_limit=, threads_per_worker=, env= (issue 15).

Memory use is kept modest: limits of 250 MiB, tasks that hold up to 400 MiB
for a moment, one or two workers.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from concurrent.futures import BrokenExecutor
from pathlib import Path

import pytest
from _resources_helpers import (
    attempts,
    blas_threads,
    env_seen_by_initializer,
    exit_now,
    grow,
    grow_in_a_child,
    grow_logged,
    grow_then_sigkill,
    pid_and_env,
    remember_env,
)
from click.testing import CliRunner

import procession
from procession.backends import _resources
from procession.backends._resources import (
    THREAD_ENV_VARS,
    ResourceControl,
    format_size,
    parse_size,
)
from procession.backends.base import default_worker_count
from procession.cli import cli
from procession.errors import WorkerCrashedError, WorkerMemoryError

LIMIT = "250MiB"
LIMIT_BYTES = 250 * 1024**2


# -- values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (4096, 4096),
        ("2GiB", 2 * 1024**3),
        ("500MB", 500 * 1000**2),
        ("500 mb", 500 * 1000**2),
        ("1.5GiB", 3 * 1024**3 // 2),
        ("300MiB", 300 * 1024**2),
        ("64kB", 64_000),
        ("1TB", 1000**4),
        ("12B", 12),
    ],
)
def test_parse_size_accepts_bytes_and_units(value: object, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize(
    "value", ["2G", "lots", "", "-1GB", "0MB", 0, -5, 1.5, True, None, "1e3MB"]
)
def test_parse_size_refuses_with_the_accepted_forms(value: object) -> None:
    with pytest.raises(ValueError, match=r"KiB, MiB, GiB, TiB") as info:
        parse_size(value)
    assert repr(value) in str(info.value)


def test_format_size() -> None:
    assert format_size(300 * 1024**2) == "300 MiB"
    assert format_size(3 * 1024**3 // 2) == "1.5 GiB"


def test_auto_threads_is_cores_over_workers_at_least_one(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in THREAD_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    cores = default_worker_count()
    assert ResourceControl.resolve(workers=1).threads == cores
    assert ResourceControl.resolve(workers=cores * 4).threads == 1
    assert ResourceControl.resolve(workers=1, threads_per_worker=None).worker_settings() is None
    settings = ResourceControl.resolve(workers=1, threads_per_worker=3).worker_settings()
    assert settings is not None and settings.threads == 3
    assert dict(settings.env)["OPENBLAS_NUM_THREADS"] == "3"
    # The automatic cap forwards a value the parent set; an explicit one overrides it.
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    auto = ResourceControl.resolve(workers=1).worker_settings()
    assert auto is not None and dict(auto.env)["OMP_NUM_THREADS"] == "7"
    explicit = ResourceControl.resolve(workers=1, threads_per_worker=2).worker_settings()
    assert explicit is not None and dict(explicit.env)["OMP_NUM_THREADS"] == "2"
    # env= wins over both.
    mine = ResourceControl.resolve(
        workers=1, threads_per_worker=2, env={"OMP_NUM_THREADS": "5"}
    ).worker_settings()
    assert mine is not None and dict(mine.env)["OMP_NUM_THREADS"] == "5"


def test_worker_memory_error_is_a_crash_and_pickles() -> None:
    error = WorkerMemoryError("too big", exitcode=-9, items=(3,), limit=10, size=20)
    assert isinstance(error, WorkerCrashedError) and isinstance(error, BrokenExecutor)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is WorkerMemoryError
    assert (str(copy), copy.exitcode, copy.items, copy.limit, copy.size) == (
        "too big",
        -9,
        (3,),
        10,
        20,
    )
    relabelled = error.with_context("too big; lost input items 7", items=(7,))
    assert type(relabelled) is WorkerMemoryError and relabelled.limit == 10
    assert relabelled.items == (7,)
    assert procession.WorkerMemoryError is WorkerMemoryError


# -- refused up front -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("memory_limit", "2G", "GiB"),
        ("memory_limit", 0, "GiB"),
        ("threads_per_worker", 0, "positive int"),
        ("threads_per_worker", "many", "'auto'"),
        ("env", {"A": 1}, "not a str"),
        ("env", {"A=B": "1"}, "environment variable name"),
        ("env", ["A"], "dict"),
    ],
)
def test_bad_values_are_refused_up_front(
    process_backend_name: str, option: str, value: object, words: str
) -> None:
    with pytest.raises(ValueError, match=option) as info:
        procession.create_backend(process_backend_name, **{option: value})
    assert words in str(info.value)
    with pytest.raises(ValueError, match=option):
        procession.Executor(process_backend_name, **{option: value})


@pytest.mark.parametrize("name", ["threads", "serial"])
@pytest.mark.parametrize(
    ("option", "value"),
    [("memory_limit", "1GiB"), ("env", {"A": "b"}), ("threads_per_worker", 2)],
)
def test_in_process_backends_refuse_what_they_cannot_honour(
    name: str, option: str, value: object
) -> None:
    with pytest.raises(ValueError, match=rf"backend '{name}' cannot honour {option}=") as info:
        procession.create_backend(name, **{option: value})
    assert "process backend" in str(info.value)
    with pytest.raises(ValueError, match="cannot honour"):
        procession.Executor(name, **{option: value})


def test_in_process_backends_accept_the_unset_values() -> None:
    backend = procession.create_backend(
        "threads", memory_limit=None, threads_per_worker=None, env={}
    )
    assert list(procession.map(abs, [-1, 2], backend=backend)) == [1, 2]
    backend.shutdown()
    assert not procession.available_backends()["threads"].capabilities.memory_limit  # type: ignore[union-attr]


def test_executor_with_a_backend_instance_refuses_resource_options() -> None:
    backend = procession.create_backend("threads")
    with pytest.raises(ValueError, match="create_backend"):
        procession.Executor(backend, memory_limit="1GiB")


def test_dask_refuses_memory_limit_on_an_existing_cluster() -> None:
    pytest.importorskip("distributed")
    with pytest.raises(ValueError, match=r"memory_limit=.*embedded LocalCluster.*--memory-limit"):
        procession.create_backend("dask", address="tcp://127.0.0.1:1", memory_limit="1GiB")


def test_capabilities_and_cli_show_the_resource_options() -> None:
    infos = procession.available_backends()
    for name in ("process", "multiprocessing", "loky", "dask"):
        caps = infos[name].capabilities
        assert caps is not None and caps.memory_limit and caps.threads_per_worker and caps.env
    result = CliRunner().invoke(cli, ["backends", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["process"]["resources"] == ["memory_limit", "threads_per_worker", "env"]
    assert payload["threads"]["resources"] == []
    table = CliRunner().invoke(cli, ["backends"]).output
    row = next(line for line in table.splitlines() if line.startswith("loky"))
    assert "memory_limit, threads_per_worker, env" in row


# -- memory_limit on every process backend --------------------------------------------


def test_memory_limit_stops_the_worker_and_the_pool_heals(
    process_backend_name: str, tmp_path: Path
) -> None:
    log = tmp_path / "attempts"
    with procession.Executor(process_backend_name, workers=2, memory_limit=LIMIT) as executor:
        results = list(
            executor.map(
                grow_logged,
                [(10, os.devnull), (400, str(log)), (10, os.devnull)],
                chunksize=1,
                retries=2,
                on_error="return",
            )
        )
        assert results[0] == 10 and results[2] == 10, results
        error = results[1]
        assert isinstance(error, WorkerMemoryError), repr(error)
        assert error.limit == LIMIT_BYTES
        assert error.size is not None and error.size > LIMIT_BYTES
        assert error.items == (1,)
        message = str(error)
        assert "memory_limit=250 MiB" in message
        assert f"reached {format_size(error.size)}" in message
        assert "lost input items 1 after 3 attempts" in message
        # retries=2: three attempts, each on a fresh worker, then it fails (no loop).
        tried = attempts(log)
        assert len(tried) == 3, tried
        assert len(set(tried)) == 3, f"each retry must run on a fresh worker: {tried}"
        # The pool healed: the next map runs on replacement workers.
        assert list(executor.map(grow, [1, 2, 3], chunksize=1)) == [1, 2, 3]


def test_memory_of_a_workers_children_counts_and_they_are_stopped_too() -> None:
    # The autouse fixture fails the test if the child outlives its worker.
    with procession.Executor("process", workers=1, memory_limit=LIMIT) as executor:
        with pytest.raises(WorkerMemoryError, match="over its memory_limit=250 MiB"):
            executor.submit(grow_in_a_child, 400).result(timeout=60)
        assert executor.submit(grow, 1).result(timeout=60) == 1


def test_submit_fails_with_worker_memory_error(process_backend_name: str) -> None:
    with procession.Executor(process_backend_name, workers=1, memory_limit=LIMIT) as executor:
        future = executor.submit(grow, 400)
        with pytest.raises(WorkerMemoryError, match="over its memory_limit=250 MiB"):
            future.result(timeout=60)
        assert executor.submit(grow, 1).result(timeout=60) == 1


def test_sigkill_after_high_memory_is_reported_as_probably_out_of_memory(
    process_backend_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "High" is 10% of the machine's memory; here anything over ~1 MiB counts.
    monkeypatch.setattr(_resources, "OOM_SUSPECT_FRACTION", 1e-6)
    with procession.Executor(process_backend_name, workers=1) as executor:
        with pytest.raises(WorkerCrashedError) as info:
            list(executor.map(grow_then_sigkill, [50]))
        assert not isinstance(info.value, WorkerMemoryError)
        message = str(info.value)
        assert "killed by SIGKILL, probably out of memory: last seen at" in message, message
        last_seen = int(message.split("last seen at ")[1].split(" MiB")[0])
        assert last_seen >= 50, message
        assert list(executor.map(grow, [1])) == [1]


def test_plain_sigkill_is_not_blamed_on_memory(process_backend_name: str) -> None:
    with procession.Executor(process_backend_name, workers=1) as executor:
        with pytest.raises(WorkerCrashedError) as info:
            list(executor.map(grow_then_sigkill, [1]))
        assert "SIGKILL" in str(info.value)
        assert "out of memory" not in str(info.value)


# -- threads_per_worker ---------------------------------------------------------------


@pytest.fixture
def no_thread_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    """The automatic cap forwards the parent's own variables: start without any."""
    for var in THREAD_ENV_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.mark.usefixtures("no_thread_vars")
def test_default_thread_cap_is_cores_over_workers(process_backend_name: str) -> None:
    expected = max(1, default_worker_count() // 2)
    with procession.Executor(process_backend_name, workers=2) as executor:
        seen = list(executor.map(blas_threads, range(2), chunksize=1))
    for report in seen:
        assert report["blas"] == [expected], report
        assert report["OMP_NUM_THREADS"] == report["OPENBLAS_NUM_THREADS"] == str(expected)


@pytest.mark.usefixtures("no_thread_vars")
def test_explicit_thread_cap_reaches_threadpoolctl(process_backend_name: str) -> None:
    # One worker: the default would be every core; the explicit cap says 1.
    with procession.Executor(process_backend_name, workers=1, threads_per_worker=1) as executor:
        (report,) = executor.map(blas_threads, [0])
    assert report["blas"] == [1], report
    assert report["OPENBLAS_NUM_THREADS"] == "1"


@pytest.mark.usefixtures("no_thread_vars")
def test_threads_per_worker_none_leaves_libraries_alone(process_backend_name: str) -> None:
    with procession.Executor(process_backend_name, workers=1, threads_per_worker=None) as executor:
        assert executor.backend.resources.worker_settings() is None  # type: ignore[attr-defined]
        (report,) = executor.map(blas_threads, [0])
    # OpenBLAS follows whatever environment the worker has (a forkserver's, or the
    # one Dask's nanny sets): procession imposed nothing.
    own = report["OPENBLAS_NUM_THREADS"] or report["OMP_NUM_THREADS"]
    assert report["blas"] == [int(own) if own else default_worker_count()], report


# -- env --------------------------------------------------------------------------------


def test_env_reaches_workers_started_after_the_parent_changed_its_own(
    process_backend_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = ["PROCESSION_TEST_ENV", "PROCESSION_TEST_LATER"]
    monkeypatch.delenv("PROCESSION_TEST_ENV", raising=False)
    with procession.Executor(
        process_backend_name,
        workers=1,
        env={"PROCESSION_TEST_ENV": "from env="},
        initializer=remember_env,
        initargs=("PROCESSION_TEST_ENV",),
    ) as executor:
        first_pid, first = executor.submit(pid_and_env, names).result(timeout=60)
        assert first["PROCESSION_TEST_ENV"] == "from env="
        # The initializer already saw it: env= is set before any of the user's code.
        assert executor.submit(env_seen_by_initializer, names[0]).result(60) == "from env="
        # The parent changes its own environment, then a worker is replaced.
        monkeypatch.setenv("PROCESSION_TEST_ENV", "changed in the parent")
        monkeypatch.setenv("PROCESSION_TEST_LATER", "set later in the parent")
        with pytest.raises(WorkerCrashedError):
            executor.submit(exit_now, None).result(timeout=60)
        later_pid, later = executor.submit(pid_and_env, names).result(timeout=60)
        assert later_pid != first_pid, "the worker was not replaced"
        assert later["PROCESSION_TEST_ENV"] == "from env=", later
        assert executor.submit(env_seen_by_initializer, names[0]).result(60) == "from env="


def test_libraries_loaded_before_the_cap_are_capped_by_threadpoolctl() -> None:
    # A worker forked from a parent that had numpy loaded: the variables come too
    # late for OpenBLAS, so threadpoolctl must cap it.
    code = (
        "import numpy, threadpoolctl\n"
        "from procession.backends._resources import WorkerSettings, apply_in_worker\n"
        "from procession.backends._resources import _thread_pool_library_loaded\n"
        "assert _thread_pool_library_loaded()\n"
        "apply_in_worker(WorkerSettings(threads=1))\n"
        "print(sorted({p['num_threads'] for p in threadpoolctl.threadpool_info()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV_VARS}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[1]"
