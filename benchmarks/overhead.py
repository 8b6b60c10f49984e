"""Per-item overhead and throughput: procession's backends against the usual tools.

Every contender maps ``inc`` (``x + 1``) over the same ``range(N)`` on a warm
pool of the same size, and we time the whole map, results consumed.  Per-item
overhead is that time divided by N: with a task this small it is all
scheduling, serialization and transport.  Also measured: how long a warm pool
takes to start a one-item map (first result), and ``import procession``.

Run (joblib and mpire are in the ``bench`` dependency group; ``uv run --with``
fetches just them where the whole group does not build)::

    uv run --with joblib --with mpire python benchmarks/overhead.py
    uv run --with joblib --with mpire python benchmarks/overhead.py --json out.json

A contender whose tool is missing is reported as FAILED in its row; the others run.

Not a test: timings depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from typing import Any


def inc(x: int) -> int:
    return x + 1


@dataclass
class Row:
    name: str
    seconds: float | None  # best of the repeats, for the whole map
    items: int
    note: str = ""
    error: str | None = None

    @property
    def per_item_us(self) -> float | None:
        return None if self.seconds is None else self.seconds / self.items * 1e6

    @property
    def throughput(self) -> float | None:
        return None if not self.seconds else self.items / self.seconds


# A contender: a context manager that starts and warms a pool, then yields
# run(items) -> results.
Contender = Callable[[int], AbstractContextManager[Callable[[range], list[int]]]]


def _warm(run: Callable[[range], list[int]]) -> None:
    # Twice: the first map starts the workers, the second lets them settle.
    for _ in range(2):
        assert run(range(1000)) == list(range(1, 1001))


@contextmanager
def procession_backend(name: str, workers: int) -> Iterator[Callable[[range], list[int]]]:
    import procession

    backend = procession.create_backend(name, workers=workers)
    try:

        def run(items: range) -> list[int]:
            return list(procession.map(inc, items, backend=backend, chunksize="auto"))

        _warm(run)
        # Auto chunking learns per call; one full-size run teaches it nothing
        # it keeps, so every timed run starts from scratch, as a user's would.
        yield run
    finally:
        backend.shutdown()


@contextmanager
def procession_one_shot(workers: int) -> Iterator[Callable[[range], list[int]]]:
    import procession

    def run(items: range) -> list[int]:
        return list(procession.map(inc, items, workers=workers))

    _warm(run)
    try:
        yield run
    finally:
        procession.api.shutdown_shared_backends()


@contextmanager
def pool_map(workers: int, imap: bool = False) -> Iterator[Callable[[range], list[int]]]:
    with multiprocessing.get_context("forkserver").Pool(workers) as pool:

        def run(items: range) -> list[int]:
            return list(pool.imap(inc, items)) if imap else pool.map(inc, items)

        _warm(run)
        yield run


@contextmanager
def pool_executor(workers: int, chunksize: int = 1) -> Iterator[Callable[[range], list[int]]]:
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(workers, mp_context=context) as executor:

        def run(items: range) -> list[int]:
            return list(executor.map(inc, items, chunksize=chunksize))

        _warm(run)
        yield run


@contextmanager
def joblib_parallel(workers: int) -> Iterator[Callable[[range], list[int]]]:
    from joblib import Parallel, delayed

    with Parallel(n_jobs=workers) as parallel:

        def run(items: range) -> list[int]:
            return list(parallel(delayed(inc)(x) for x in items))

        _warm(run)
        yield run


@contextmanager
def mpire_pool(workers: int) -> Iterator[Callable[[range], list[int]]]:
    from mpire import WorkerPool

    with WorkerPool(n_jobs=workers, keep_alive=True) as pool:

        def run(items: range) -> list[int]:
            return list(pool.map(inc, items, progress_bar=False))

        _warm(run)
        yield run


def contenders() -> dict[str, tuple[Callable[[int], AbstractContextManager[Any]], str]]:
    return {
        "procession process": (lambda w: procession_backend("process", w), 'chunksize="auto"'),
        "procession loky": (lambda w: procession_backend("loky", w), 'chunksize="auto"'),
        "procession multiprocessing": (
            lambda w: procession_backend("multiprocessing", w),
            'chunksize="auto"',
        ),
        "procession.map one-shot": (procession_one_shot, "shared warm pool, default backend"),
        "multiprocessing.Pool.map": (pool_map, "default chunks"),
        "multiprocessing.Pool.imap": (lambda w: pool_map(w, imap=True), "chunksize=1 (default)"),
        "ProcessPoolExecutor.map": (pool_executor, "chunksize=1 (default)"),
        "ProcessPoolExecutor.map c=1000": (lambda w: pool_executor(w, 1000), "chunksize=1000"),
        "joblib.Parallel": (joblib_parallel, "n_jobs=workers, auto batching"),
        "mpire.WorkerPool.map": (mpire_pool, "keep_alive=True"),
    }


def measure(
    name: str, factory: Callable[[int], AbstractContextManager[Any]], note: str, args: Any
) -> Row:
    items = range(args.items)
    expected = list(range(1, args.items + 1))
    try:
        with factory(args.workers) as run:
            times = []
            for _ in range(args.repeat):
                started = time.perf_counter()
                result = run(items)
                times.append(time.perf_counter() - started)
                if result != expected:
                    raise AssertionError("wrong results")
                if sum(times) > args.budget:
                    break  # slow contenders: one or two runs say enough
    except Exception as exc:
        return Row(name, None, args.items, note, error=f"{type(exc).__name__}: {exc}")
    return Row(name, min(times), args.items, note)


def start_latency(name: str, workers: int, runs: int = 30) -> float:
    """Median seconds from calling map() to its first result, on a warm pool."""
    import procession

    backend = procession.create_backend(name, workers=workers)
    try:
        _warm(lambda items: list(procession.map(inc, items, backend=backend)))
        samples = []
        for i in range(runs):
            started = time.perf_counter()
            next(iter(procession.map(inc, [i], backend=backend)))
            samples.append(time.perf_counter() - started)
        return statistics.median(samples)
    finally:
        backend.shutdown()


def import_time(runs: int = 7) -> float:
    """Best wall time of ``import procession`` in a fresh interpreter."""
    code = "import time; t = time.perf_counter(); import procession; print(time.perf_counter() - t)"
    samples = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-W", "ignore", "-c", code],
            capture_output=True,
            text=True,
            check=True,
        )
        samples.append(float(out.stdout.strip().splitlines()[-1]))
    return min(samples)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000, help="calls of x + 1 per map")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--repeat", type=int, default=3, help="timed maps per contender (best)")
    parser.add_argument(
        "--budget", type=float, default=5.0, help="stop repeating a contender after this many s"
    )
    parser.add_argument("--only", nargs="*", help="run only contenders whose name contains these")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    chosen = {
        name: spec
        for name, spec in contenders().items()
        if not args.only or any(part in name for part in args.only)
    }
    print(
        f"{args.items:,} calls of x + 1, {args.workers} workers, warm pools, best of "
        f"{args.repeat}; Python {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs\n"
    )
    rows = []
    header = f"{'contender':32} {'per item (µs)':>14} {'items/s':>12}  note"
    print(header)
    print("-" * len(header))
    for name, (factory, note) in chosen.items():
        row = measure(name, factory, note, args)
        rows.append(row)
        tail = row.note if row.error is None else f"FAILED: {row.error}"
        print(
            f"{row.name:32} {_fmt(row.per_item_us, '14.3f')} {_fmt(row.throughput, '12,.0f')}  "
            f"{tail}",
            flush=True,
        )

    print()
    latencies = {}
    for name in ("process", "loky", "multiprocessing"):
        try:
            latencies[name] = start_latency(name, args.workers)
            print(f"warm-pool start of a map ({name}): {latencies[name] * 1e3:.2f} ms")
        except Exception as exc:
            print(f"warm-pool start of a map ({name}): FAILED: {type(exc).__name__}: {exc}")
    imported = import_time()
    print(f"import procession: {imported * 1e3:.1f} ms")

    if args.json:
        payload = {
            "items": args.items,
            "workers": args.workers,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "rows": [
                {**asdict(row), "per_item_us": row.per_item_us, "throughput": row.throughput}
                for row in rows
            ],
            "warm_start_seconds": latencies,
            "import_seconds": imported,
        }
        with open(args.json, "w") as out:
            json.dump(payload, out, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
