"""procession.joblib: joblib.Parallel and scikit-learn on procession backends.

Run with the real joblib and scikit-learn (both in the dev group).  joblib's
own test_parallel.py runs against this backend in tests/test_joblib_suite.py.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from typing import Any

import joblib
import pytest
from joblib import Parallel, delayed

import procession
import procession.joblib
from procession import pools
from procession.joblib import ProcessionBackend


@pytest.fixture(autouse=True, scope="module")
def registered() -> None:
    procession.joblib.register()


# -- functions the workers run --------------------------------------------------------


def square(x: int) -> int:
    return x * x


def fail_on_three(x: int) -> int:
    if x == 3:
        raise KeyError(f"bad item {x}")
    return x


def sleep_then(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


def pid(_: object) -> int:
    return os.getpid()


def nested_default(n: int) -> int:
    """A Parallel inside a task, on joblib's default nested backend."""
    return sum(Parallel(n_jobs=2)(delayed(square)(i) for i in range(n)))


def nested_by_name(n: int) -> tuple[int, int]:
    """A Parallel inside a task that asks for the procession backend by name."""
    with joblib.parallel_config(backend="procession", n_jobs=2):
        total = sum(Parallel()(delayed(square)(i) for i in range(n)))
    return total, ProcessionBackend().effective_n_jobs(4)


def thread_limits(_: object) -> tuple[str | None, list[int]]:
    import numpy  # noqa: F401  (loads the BLAS whose thread pool is capped)
    from threadpoolctl import threadpool_info

    return os.environ.get("OMP_NUM_THREADS"), [info["num_threads"] for info in threadpool_info()]


# -- the basics, on every backend ------------------------------------------------------


def test_parallel_gives_the_sequential_answer(backend_name: str) -> None:
    with joblib.parallel_config(backend="procession", n_jobs=2, use=backend_name):
        assert Parallel()(delayed(square)(i) for i in range(30)) == [i * i for i in range(30)]
        with pytest.raises(KeyError, match="bad item 3"):
            Parallel()(delayed(fail_on_three)(i) for i in range(6))
        # The backend is usable again after a failure.
        assert Parallel()(delayed(square)(i) for i in range(4)) == [0, 1, 4, 9]


# -- joblib's interface ----------------------------------------------------------------


def test_register_is_idempotent_and_checks_the_name() -> None:
    procession.joblib.register()
    procession.joblib.register()
    assert "procession" in joblib.parallel.BACKENDS
    with pytest.raises(TypeError, match="non-empty str"):
        procession.joblib.register("")


def test_procession_joblib_is_reachable_after_a_plain_import() -> None:
    # A fresh interpreter: `import procession` alone, then the attribute.
    code = "import procession; print(procession.joblib.register.__module__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "procession.joblib"


def test_use_must_name_a_procession_backend() -> None:
    with (
        pytest.raises(ValueError, match=r"no-such-backend.*choose one of"),
        joblib.parallel_config(backend="procession", use="no-such-backend"),
    ):
        pass


def test_lambdas_closures_and_generators_of_results() -> None:
    offset = 5
    with joblib.parallel_config(backend="procession", n_jobs=2, use="process"):
        assert Parallel()(delayed(lambda x: x + offset)(i) for i in range(4)) == [5, 6, 7, 8]
        lazy = Parallel(return_as="generator")(delayed(square)(i) for i in range(6))
        assert list(lazy) == [i * i for i in range(6)]
        unordered = Parallel(return_as="generator_unordered")(delayed(square)(i) for i in range(6))
        assert sorted(unordered) == [i * i for i in range(6)]


def test_warm_pool_is_reused_across_parallel_calls() -> None:
    with joblib.parallel_config(backend="procession", n_jobs=2, use="process"):
        first = set(Parallel()(delayed(pid)(i) for i in range(8)))
        second = set(Parallel()(delayed(pid)(i) for i in range(8)))
    warm = pools.shared_backend("process", 2)
    assert first | second <= warm.worker_pids()
    assert os.getpid() not in first


def test_auto_batching_groups_tiny_tasks() -> None:
    backend = ProcessionBackend(use="process")
    submitted: list[int] = []
    original = backend.submit

    def counting_submit(func: Any, callback: Any = None) -> Any:
        submitted.append(len(func))
        return original(func, callback)

    backend.submit = counting_submit  # type: ignore[method-assign]
    results = Parallel(n_jobs=2, backend=backend)(delayed(square)(i) for i in range(3000))
    assert results == [i * i for i in range(3000)]
    # Batches grow past one task each once joblib has measured them.
    assert len(submitted) < 3000
    assert max(submitted) > 1


def test_effective_n_jobs() -> None:
    backend = ProcessionBackend(use="process")
    assert backend.effective_n_jobs(3) == 3
    assert backend.effective_n_jobs(-1) == joblib.cpu_count()
    assert backend.effective_n_jobs(None) == 1
    assert ProcessionBackend(use="serial").effective_n_jobs(4) == 1
    with pytest.raises(ValueError, match="n_jobs == 0"):
        backend.effective_n_jobs(0)


def test_nested_parallel_inside_a_worker() -> None:
    with joblib.parallel_config(backend="procession", n_jobs=2, use="process"):
        assert Parallel()(delayed(nested_default)(n) for n in (3, 4)) == [5, 14]
        # The backend is registered in the worker too, and there a nested call
        # gets one job (it runs in the worker instead of starting a pool).
        assert Parallel()(delayed(nested_by_name)(n) for n in (3, 4)) == [(5, 1), (14, 1)]


def test_inner_max_num_threads_caps_worker_thread_pools() -> None:
    pytest.importorskip("threadpoolctl")  # installed with scikit-learn (dev group)
    with joblib.parallel_config(
        backend="procession", n_jobs=2, use="process", inner_max_num_threads=1
    ):
        for env, counts in Parallel()(delayed(thread_limits)(i) for i in range(2)):
            assert env == "1"
            assert all(count == 1 for count in counts)


def test_backend_options_pass_to_create_backend() -> None:
    with joblib.parallel_config(
        backend="procession", n_jobs=2, use="process", start_method="spawn"
    ):
        assert Parallel()(delayed(square)(i) for i in range(5)) == [0, 1, 4, 9, 16]
    with (
        pytest.raises(TypeError, match="no_such_option"),
        joblib.parallel_config(backend="procession", n_jobs=2, use="threads", no_such_option=1),
    ):
        Parallel()(delayed(square)(i) for i in range(5))
    procession.joblib._shutdown_option_pools()


def test_use_accepts_a_backend_instance() -> None:
    with procession.create_backend("threads", workers=2) as backend:
        with joblib.parallel_config(backend="procession", n_jobs=2, use=backend):
            assert Parallel()(delayed(square)(i) for i in range(5)) == [0, 1, 4, 9, 16]
        with (
            pytest.raises(ValueError, match="create_backend"),
            joblib.parallel_config(backend="procession", use=backend, address="x"),
        ):
            pass


def test_abort_stops_running_batches() -> None:
    started = time.monotonic()
    with (
        joblib.parallel_config(backend="procession", n_jobs=2, use="process"),
        pytest.raises(KeyError),
    ):
        Parallel(batch_size=1)(
            delayed(fail_on_three)(3) if i == 1 else delayed(sleep_then)(60) for i in range(4)
        )
    # The 60 s batches were killed with their workers, not waited for.
    assert time.monotonic() - started < 40
    with joblib.parallel_config(backend="procession", n_jobs=2, use="process"):
        assert Parallel()(delayed(square)(i) for i in range(3)) == [0, 1, 4]


def test_parallel_timeout() -> None:
    with (
        joblib.parallel_config(backend="procession", n_jobs=2, use="process"),
        pytest.raises((TimeoutError, multiprocessing.TimeoutError)),
    ):
        # joblib raises multiprocessing.TimeoutError (not the builtin) for Parallel(timeout=)
        Parallel(timeout=0.5)(delayed(sleep_then)(30) for _ in range(2))


def test_apply_async_for_joblib_1_4() -> None:
    backend = ProcessionBackend(use="threads")
    backend.configure(n_jobs=2)
    called: list[Any] = []
    job = backend.apply_async(lambda: 42, callback=called.append)
    assert job.get(timeout=30) == 42
    assert backend.retrieve_result_callback(job) == 42
    assert len(called) == 1
    backend.terminate()


# -- scikit-learn: identical results to joblib's default loky backend ------------------


@pytest.mark.timeout(400)
def test_scikit_learn_matches_loky() -> None:
    from joblib.externals.loky import get_reusable_executor
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, cross_val_score

    x, y = make_classification(n_samples=200, n_features=8, random_state=0)

    def fit_all() -> tuple[Any, ...]:
        scores = cross_val_score(LogisticRegression(), x, y, cv=4)
        search = GridSearchCV(LogisticRegression(), {"C": [0.1, 1.0, 10.0]}, cv=3).fit(x, y)
        forest = RandomForestClassifier(n_estimators=12, n_jobs=2, random_state=0).fit(x, y)
        return (
            list(scores),
            search.best_params_,
            list(search.cv_results_["mean_test_score"]),
            forest.predict_proba(x).tolist(),
        )

    try:
        with joblib.parallel_config(backend="loky", n_jobs=2):
            expected = fit_all()
        with joblib.parallel_config(backend="procession", n_jobs=2, use="process"):
            got = fit_all()
    finally:
        # loky keeps its own reusable executor warm; stop it (no workers left behind).
        get_reusable_executor().shutdown(wait=True, kill_workers=True)
    assert got == expected
