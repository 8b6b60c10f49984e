"""Oversubscription: numpy matrix products on every core, with and without thread caps.

Every worker's OpenBLAS (or MKL, or OpenMP) starts as many threads as there
are cores, so ``workers = cores`` processes run ``cores x cores`` busy BLAS
threads.  procession's default ``threads_per_worker="auto"`` caps each worker
at ``cores // workers`` threads (threadpoolctl plus ``OMP_NUM_THREADS`` and
friends), as joblib does for loky; ``threads_per_worker=None`` leaves the
libraries alone.  This script times the same workload both ways, side by side
in one run (the contenders take turns, so a change of load hits both), and a
sequential run in this process (numpy with all its threads) as the reference.

Run::

    uv run python benchmarks/blas.py
    uv run python benchmarks/blas.py --backend loky --size 400 --json blas.json

Not a test: timings depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import procession
from procession.backends.base import default_worker_count


def products(seed: int, size: int, rounds: int) -> float:
    """``rounds`` matrix products of ``size x size`` float64 matrices (the task)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((size, size))
    b = rng.standard_normal((size, size)) / size**0.5
    for _ in range(rounds):
        a = a @ b
        a /= np.abs(a).max()
    return float(a.sum())


def blas_threads(_: Any) -> list[int]:
    import threadpoolctl

    np.ones((2, 2)) @ np.ones((2, 2))
    return sorted({p["num_threads"] for p in threadpoolctl.threadpool_info()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="process")
    parser.add_argument("--workers", type=int, default=default_worker_count())
    parser.add_argument("--size", type=int, default=300, help="matrix side (default 300)")
    parser.add_argument("--rounds", type=int, default=20, help="products per task")
    parser.add_argument("--tasks", type=int, default=None, help="default: 8 per worker")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    tasks = args.tasks or 8 * args.workers
    seeds = list(range(tasks))

    def run_map(executor: procession.Executor) -> list[float]:
        return list(executor.map(products, seeds, [args.size] * tasks, [args.rounds] * tasks))

    def sequential() -> list[float]:
        return [products(seed, args.size, args.rounds) for seed in seeds]

    capped = procession.Executor(args.backend, workers=args.workers)
    uncapped = procession.Executor(args.backend, workers=args.workers, threads_per_worker=None)
    contenders: dict[str, Callable[[], list[float]]] = {
        "sequential (1 process, all BLAS threads)": sequential,
        f"{args.backend}, default cap (threads_per_worker='auto')": lambda: run_map(capped),
        f"{args.backend}, no cap (threads_per_worker=None)": lambda: run_map(uncapped),
    }
    threads = {
        "sequential (1 process, all BLAS threads)": blas_threads(None),
        f"{args.backend}, default cap (threads_per_worker='auto')": capped.submit(
            blas_threads, None
        ).result(),
        f"{args.backend}, no cap (threads_per_worker=None)": uncapped.submit(
            blas_threads, None
        ).result(),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    reference = sequential()
    try:
        for name, run in contenders.items():  # warm-up (imports numpy in the workers)
            assert np.allclose(run(), reference), name
        for _ in range(args.repeat):
            for name, run in contenders.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    finally:
        capped.shutdown()
        uncapped.shutdown()

    import threadpoolctl

    blas = [
        f"{p['internal_api']} {p.get('version')} {p.get('architecture')}"
        for p in threadpoolctl.threadpool_info()
    ]
    best_seq = min(times["sequential (1 process, all BLAS threads)"])
    print(
        f"{tasks} tasks x {args.rounds} products of {args.size}x{args.size} float64, "
        f"{args.workers} workers on {default_worker_count()} cores, best of {args.repeat}; "
        f"BLAS: {', '.join(blas)}; load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'contender':58} {'best s':>8} {'median s':>9} {'vs seq':>7}  BLAS threads/worker")
    rows = []
    for name, samples in times.items():
        best, median = min(samples), statistics.median(samples)
        rows.append({"name": name, "best": best, "median": median, "threads": threads[name]})
        print(f"{name:58} {best:8.3f} {median:9.3f} {best_seq / best:6.2f}x  {threads[name]}")
    names = list(times)
    ratio = min(times[names[2]]) / min(times[names[1]])
    print(f"no cap / default cap (best times): {ratio:.2f}")
    if args.json_path:
        with open(args.json_path, "w") as out:
            json.dump(
                {
                    "python": sys.version.split()[0],
                    "platform": platform.platform(),
                    "cores": default_worker_count(),
                    "workers": args.workers,
                    "size": args.size,
                    "rounds": args.rounds,
                    "tasks": tasks,
                    "blas": blas,
                    "rows": rows,
                    "uncapped_over_capped": ratio,
                },
                out,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
