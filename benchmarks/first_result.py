"""Time to first result from a slow source.

A source yields one item every ``--period`` seconds.  Before it, the same
function is mapped once over a fast input, so the scheduler's per-function
memory knows the function is very fast and would size chunks of thousands of
items.  The scheduler must still send a chunk once reading it has taken a short
bounded time: the first result should arrive after about one item period, one
task time and ~100 ms, and the following ones steadily, on every backend.

    uv run python benchmarks/first_result.py --period 0.005 --items 200
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Iterator

import procession
import procession.pools


def quick(x: int) -> int:
    return x + 1


def trickle(count: int, period: float) -> Iterator[int]:
    for i in range(count):
        time.sleep(period)
        yield i


def measure(backend: str, period: float, items: int) -> dict[str, float]:
    list(procession.map(quick, range(50_000), backend=backend, workers=2))  # warm, and teach
    started = time.monotonic()
    arrivals: list[float] = []
    for _ in procession.map(quick, trickle(items, period), backend=backend, workers=2):
        arrivals.append(time.monotonic() - started)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return {
        "first_s": arrivals[0],
        "bound_s": period + 0.1,
        "median_gap_s": statistics.median(gaps) if gaps else 0.0,
        "max_gap_s": max(gaps) if gaps else 0.0,
        "total_s": arrivals[-1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--period", type=float, default=0.005)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--backends", default="process,multiprocessing,loky,threads,dask")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = {}
    print(f"{'backend':<16} {'first (s)':>10} {'bound (s)':>10} {'median gap':>11} {'max gap':>9}")
    for backend in args.backends.split(","):
        row = measure(backend, args.period, args.items)
        rows[backend] = row
        print(
            f"{backend:<16} {row['first_s']:>10.3f} {row['bound_s']:>10.3f} "
            f"{row['median_gap_s']:>11.4f} {row['max_gap_s']:>9.3f}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"period": args.period, "items": args.items, "rows": rows}, handle, indent=2)
    procession.pools.shutdown_shared_pools()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
