"""scikit-learn on procession's joblib backend against joblib's default loky backend.

    uv run python benchmarks/sklearn.py [--workers 2] [--repeat 3] [--quick] [--json FILE]

The same fits, side by side in one run, each backend named explicitly through
``joblib.parallel_config`` with the same ``n_jobs``:

- ``GridSearchCV``: a RandomForestClassifier (50 trees) over a 3 x 2 grid,
  3-fold, so 18 fits dispatched by joblib in batches;
- ``RandomForestClassifier(n_estimators=300, n_jobs=N).fit``: the trees are
  built by joblib;
- ``cross_val_score`` of a LogisticRegression, 5-fold: tiny tasks, so this row
  is about per-call overhead.

Both backends are warmed up first (pools started, scikit-learn imported in the
workers: loky keeps its reusable executor, procession its shared pool), then
each case is timed in alternation (procession first in even rounds, loky
first in odd ones), best of ``--repeat``.
CPU seconds (parent plus workers, least over the rounds) are reported beside
the wall time: on a shared machine they say how much work each backend did
when the wall time mostly says what else was running.  The results are
checked to be identical (scores, best parameters, predicted
probabilities) before anything is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# This script is named after the package it measures; run as a script, its own
# directory comes first on sys.path and would shadow scikit-learn.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import joblib
import psutil
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_val_score

import procession.joblib

BACKENDS = {"procession": {"backend": "procession", "use": "process"}, "loky": {"backend": "loky"}}


def cases(quick: bool, workers: int) -> dict[str, Callable[[], Any]]:
    samples = 600 if quick else 4000
    x, y = make_classification(n_samples=samples, n_features=20, n_informative=8, random_state=0)
    trees = 20 if quick else 300

    def grid_search() -> Any:
        search = GridSearchCV(
            RandomForestClassifier(n_estimators=20 if quick else 50, random_state=0),
            {"max_depth": [4, 8, None], "min_samples_leaf": [1, 5]},
            cv=3,
        ).fit(x, y)
        return search.best_params_, search.cv_results_["mean_test_score"].tolist()

    def random_forest() -> Any:
        forest = RandomForestClassifier(n_estimators=trees, n_jobs=workers, random_state=0)
        return forest.fit(x, y).predict_proba(x).tolist()

    def cross_val() -> Any:
        return cross_val_score(LogisticRegression(max_iter=500), x, y, cv=5).tolist()

    return {
        "GridSearchCV (RF, 6 params x 3 folds)": grid_search,
        f"RandomForestClassifier({trees} trees).fit": random_forest,
        "cross_val_score (LogReg, 5 folds)": cross_val,
    }


def cpu_seconds() -> tuple[float, float]:
    """CPU time used so far by this process and by its children (the workers)."""
    children = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue
        children += times.user + times.system
    own = os.times()
    return own.user + own.system, children


def run(backend: str, workers: int, fn: Callable[[], Any]) -> tuple[Any, float, float, float]:
    """The result, wall seconds, parent CPU seconds and worker CPU seconds of one run."""
    with joblib.parallel_config(n_jobs=workers, **BACKENDS[backend]):  # type: ignore[arg-type]
        parent_before, workers_before = cpu_seconds()
        started = time.perf_counter()
        result = fn()
        wall = time.perf_counter() - started
        parent_after, workers_after = cpu_seconds()
        return result, wall, parent_after - parent_before, workers_after - workers_before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    procession.joblib.register()
    workloads = cases(args.quick, args.workers)

    # Warm-up: start both pools and import scikit-learn in their workers.
    for backend in BACKENDS:
        for fn in workloads.values():
            run(backend, args.workers, fn)

    rows = []
    for name, fn in workloads.items():
        best = {backend: float("inf") for backend in BACKENDS}
        cpu = {backend: (float("inf"), float("inf")) for backend in BACKENDS}
        results: dict[str, Any] = {}
        for round_ in range(args.repeat):
            # Alternate, so both see the same machine; swap who goes first each
            # round, so neither always runs right after the other's work.
            order = list(BACKENDS) if round_ % 2 == 0 else list(reversed(BACKENDS))
            for backend in order:
                results[backend], seconds, parent_cpu, worker_cpu = run(backend, args.workers, fn)
                best[backend] = min(best[backend], seconds)
                cpu[backend] = min(cpu[backend], (parent_cpu + worker_cpu, parent_cpu))
        if results["procession"] != results["loky"]:
            sys.exit(f"{name}: procession and loky gave different results")
        rows.append(
            {
                "case": name,
                "procession_s": best["procession"],
                "loky_s": best["loky"],
                "ratio": best["procession"] / best["loky"],
                "procession_cpu_s": cpu["procession"][0],
                "loky_cpu_s": cpu["loky"][0],
                "procession_parent_cpu_s": cpu["procession"][1],
                "loky_parent_cpu_s": cpu["loky"][1],
                "identical": True,
            }
        )

    print(
        f"workers={args.workers} repeat={args.repeat} cpus={os.cpu_count()} "
        f"python={platform.python_version()} joblib={joblib.__version__} "
        f"load={os.getloadavg()[0]:.1f}"
    )
    print(
        f"| {'case':<42} | procession (s) | loky (s) | procession / loky "
        f"| CPU s procession | CPU s loky | identical |"
    )
    print(f"|{'-' * 44}|---------------:|---------:|------------------:|---:|---:|:---------:|")
    for row in rows:
        print(
            f"| {row['case']:<42} | {row['procession_s']:14.3f} | {row['loky_s']:8.3f} "
            f"| {row['ratio']:17.2f} | {row['procession_cpu_s']:.2f} "
            f"({row['procession_parent_cpu_s']:.2f} parent) | {row['loky_cpu_s']:.2f} "
            f"({row['loky_parent_cpu_s']:.2f} parent) | {'yes' if row['identical'] else 'no':^9} |"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"workers": args.workers, "repeat": args.repeat, "rows": rows}, out, indent=2)


if __name__ == "__main__":
    main()
