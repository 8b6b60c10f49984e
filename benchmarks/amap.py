"""Per-item overhead from asyncio: ``procession.amap`` against what async code uses today.

The workload of ``benchmarks/overhead.py``: ``inc(x) = x + 1`` over
``range(N)`` on a warm pool of the same size, results consumed, best of the
repeats; with a task this small, time per item is all scheduling, transport
and (here) the hand-over to the event loop.  Side by side, in one run:

- ``procession.map`` (synchronous, the baseline amap is held to: 1.5x);
- ``procession.amap`` over the same list, then over an async generator;
- ``loop.run_in_executor(ProcessPoolExecutor, ...)`` once per item +
  ``asyncio.gather`` (what most services write);
- ``aiomultiprocess.Pool.map`` (an async coroutine per item, its own loop in
  each worker).

The slow contenders get ``--slow-items`` items (per-item cost is what counts).

Run (aiomultiprocess is in the ``bench`` dependency group; ``uv run --with``
fetches just it)::

    uv run --with aiomultiprocess python benchmarks/amap.py
    uv run --with aiomultiprocess python benchmarks/amap.py --repeat 7 --json amap.json

Not a test: timings depend on the machine and on what else runs on it; read
the ratios between rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any


def inc(x: int) -> int:
    return x + 1


async def ainc(x: int) -> int:
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


Runner = Callable[[range], Awaitable[list[int]]]


async def measure(
    name: str, note: str, runner: Runner, items: int, repeat: int, budget: float
) -> Row:
    data = range(items)
    expected = list(range(1, items + 1))
    try:
        for _ in range(2):  # warm: the first run starts workers, the second settles
            assert await runner(range(1000)) == list(range(1, 1001))
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            result = await runner(data)
            times.append(time.perf_counter() - started)
            if result != expected:
                raise AssertionError("wrong results")
            if sum(times) > budget:
                break
    except Exception as exc:
        return Row(name, None, items, note, error=f"{type(exc).__name__}: {exc}")
    return Row(name, min(times), items, note)


async def numbers(items: range) -> AsyncIterator[int]:
    for x in items:
        yield x


async def run_all(args: argparse.Namespace) -> list[Row]:
    import procession

    rows: list[Row] = []
    backend = procession.create_backend(args.backend, workers=args.workers)
    context = multiprocessing.get_context("forkserver")
    executor = ProcessPoolExecutor(args.workers, mp_context=context)
    loop = asyncio.get_running_loop()

    async def sync_map(items: range) -> list[int]:
        # Blocks the loop on purpose: the synchronous baseline.
        return list(procession.map(inc, items, backend=backend))

    async def amap_list(items: range) -> list[int]:
        return [y async for y in procession.amap(inc, items, backend=backend)]

    async def amap_async_source(items: range) -> list[int]:
        return [y async for y in procession.amap(inc, numbers(items), backend=backend)]

    async def gather_executor(items: range) -> list[int]:
        return list(await asyncio.gather(*(loop.run_in_executor(executor, inc, x) for x in items)))

    contenders: list[tuple[str, str, Runner, int]] = [
        ("procession.map (sync)", f"{args.backend}, chunksize='auto'", sync_map, args.items),
        ("procession.amap", "same backend, list input", amap_list, args.items),
        (
            "procession.amap, async source",
            "async generator input",
            amap_async_source,
            args.slow_items,
        ),
        (
            "run_in_executor + gather",
            "ProcessPoolExecutor, one future per item",
            gather_executor,
            args.slow_items,
        ),
    ]
    try:
        for name, note, runner, items in contenders:
            if args.only and not any(part in name for part in args.only):
                continue
            row = await measure(name, note, runner, items, args.repeat, args.budget)
            rows.append(row)
            _print_row(row)
        if not args.only or any("aiomultiprocess" in part for part in args.only):
            rows.append(await _aiomultiprocess_row(args))
            _print_row(rows[-1])
    finally:
        executor.shutdown()
        backend.shutdown()
    return rows


async def _aiomultiprocess_row(args: argparse.Namespace) -> Row:
    name, note = "aiomultiprocess.Pool.map", "coroutine per item, default settings"
    try:
        import aiomultiprocess
    except ImportError as exc:
        return Row(name, None, args.slow_items, note, error=f"not installed: {exc}")
    async with aiomultiprocess.Pool(processes=args.workers) as pool:

        async def runner(items: range) -> list[int]:
            return list(await pool.map(ainc, items))

        return await measure(name, note, runner, args.slow_items, args.repeat, args.budget)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_row(row: Row) -> None:
    tail = row.note if row.error is None else f"FAILED: {row.error}"
    print(f"{row.name:32} {row.items:>9,} {_fmt(row.per_item_us, '14.3f')}  {tail}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000, help="items for the fast rows")
    parser.add_argument(
        "--slow-items", type=int, default=10_000, help="items for the per-item-future rows"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--backend", default="process", help="procession backend to use")
    parser.add_argument("--repeat", type=int, default=5, help="timed maps per contender (best)")
    parser.add_argument(
        "--budget", type=float, default=10.0, help="stop repeating a contender after this many s"
    )
    parser.add_argument("--only", nargs="*", help="run only contenders whose name contains these")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    print(
        f"x + 1 per item, {args.workers} workers, warm pools, best of {args.repeat}; "
        f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs\n"
    )
    header = f"{'contender':32} {'items':>9} {'per item (µs)':>14}  note"
    print(header)
    print("-" * len(header))
    rows = asyncio.run(run_all(args))

    by_name = {row.name: row.per_item_us for row in rows}
    baseline, ours = by_name.get("procession.map (sync)"), by_name.get("procession.amap")
    if baseline and ours:
        print(f"\namap / map per-item cost: {ours / baseline:.2f}x (goal: at most 1.5x)")
        for other in ("run_in_executor + gather", "aiomultiprocess.Pool.map"):
            cost = by_name.get(other)
            if cost:
                print(f"{other} / amap: {cost / ours:.1f}x")
    if args.json:
        payload: dict[str, Any] = {
            "workers": args.workers,
            "backend": args.backend,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "rows": [{**asdict(row), "per_item_us": row.per_item_us} for row in rows],
        }
        with open(args.json, "w") as out:
            json.dump(payload, out, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
