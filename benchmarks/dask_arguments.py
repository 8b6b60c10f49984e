"""A large argument given to many tasks on Dask: scattered once per map, or sent with each task.

A float64 array (100 MiB by default) goes to 8 tasks (each returns ``a.sum()``)
on an embedded ``LocalCluster`` of 2 worker processes, two ways side by side,
taking turns within each repeat:

- ``stored once``: procession's default on ``dask`` (``Capabilities.buffer_store``):
  the array is scattered to the cluster once per map, and each task carries its key;
- ``in-band``: the same map with large buffers turned off
  (``shm.large_buffers(enabled=False)``), so the array is pickled into every
  task, as procession did before.

Run::

    uv run python benchmarks/dask_arguments.py                 # 100 MiB, best of 3
    uv run python benchmarks/dask_arguments.py --mib 2 --repeat 1

Not a test: timings depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import procession
from procession.serialization import shm


def total(a: np.ndarray) -> float:
    return float(a.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    a = np.random.default_rng(0).random(args.mib * (1 << 20) // 8)
    expected = [float(a.sum())] * args.tasks
    backend = procession.create_backend("dask", workers=2)
    times: dict[str, list[float]] = {"stored once": [], "in-band": []}
    try:
        list(procession.map(total, [np.ones(4)] * 4, backend=backend))  # warm the workers
        for _ in range(args.repeat):
            for way in times:
                enabled = way == "stored once"
                with shm.large_buffers(enabled=enabled):
                    started = time.perf_counter()
                    got = list(procession.map(total, [a] * args.tasks, backend=backend))
                times[way].append(time.perf_counter() - started)
                assert got == expected, got
    finally:
        backend.shutdown()
    print(
        f"{args.mib} MiB float64 array to {args.tasks} tasks on dask (2 workers), best of "
        f"{args.repeat} (s)"
    )
    for way, seconds in times.items():
        print(f"  {way:<12} {min(seconds):8.3f}")
    print(f"  in-band / stored once = {min(times['in-band']) / min(times['stored once']):.2f}x")


if __name__ == "__main__":
    main()
