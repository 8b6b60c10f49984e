"""Large arrays to worker processes: procession's shared memory against the usual tools.

A float64 array (100 MiB by default) goes to 2 tasks on a warm pool of 2
workers, and every contender runs three cases side by side in one run:

- ``one way``: each task returns ``a.sum()`` (only the argument travels);
- ``round trip``: each task returns ``a`` (the array travels both ways);
- ``a + 1``: each task returns ``a + 1`` (a new array of the same size comes back).

Contenders: procession's ``process``, ``loky`` and ``multiprocessing``
backends (large buffers through shared memory), procession's ``process``
backend given the array made once with ``shm.shared_array`` (sent by name
from then on: what a user who sends one array to many maps does), joblib with its default
memmapping (``max_nbytes="1M"``), loky's reusable executor,
``multiprocessing.Pool`` and a raw ``multiprocessing.shared_memory`` hand-off
written by hand for this one job (the parent copies ``a`` into a segment
once; each worker attaches, and writes its result into a segment of its own
that the parent wraps without a copy): the limit.

For the one-way case we also sample, every few milliseconds, the memory the
parent and its workers hold: their anonymous memory (``RssAnon``: heap,
unpickled copies, pages copied on write) plus this run's files in
``/dev/shm`` (procession's segments, joblib's memmaps, ``SharedMemory``
segments), each counted once however many processes map them; and report the
peak above the level just before the call (array already made, pool warm), as
a multiple of the array size: hidden copies show there.

Run::

    uv run python benchmarks/arrays.py                      # 100 MiB, best of 5
    uv run python benchmarks/arrays.py --mib 2 --repeat 1   # the quick check the tests run

Not a test: timings depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing import shared_memory
from typing import Any

import numpy as np

CASES = ("one way", "round trip", "a + 1")
Run = Callable[[np.ndarray, str], list[Any]]


# -- the tasks ------------------------------------------------------------------


def total(a: np.ndarray) -> float:
    return float(a.sum())


def echo(a: np.ndarray) -> np.ndarray:
    return a


def plus_one(a: np.ndarray) -> np.ndarray:
    return a + 1


TASKS = {"one way": total, "round trip": echo, "a + 1": plus_one}


def raw_task(job: tuple[str, str, tuple[int, ...]]) -> Any:
    """The hand-written limit: attach, compute, write the result to a new segment."""
    case, name, shape = job
    # Python < 3.13 registers an attached segment with the resource tracker as if
    # this process had created it (CPython issue 82300).  The forkserver workers
    # share the parent's tracker, whose registry is a set: registering again is
    # harmless, and the parent's unlink() unregisters once.
    source = shared_memory.SharedMemory(name=name)
    try:
        a = np.ndarray(shape, dtype=np.float64, buffer=source.buf)
        if case == "one way":
            return float(a.sum())
        out = shared_memory.SharedMemory(create=True, size=a.nbytes)  # the parent unlinks it
        result = np.ndarray(shape, dtype=np.float64, buffer=out.buf)
        if case == "round trip":
            result[...] = a
        else:
            np.add(a, 1, out=result)
        del result
        out.close()
        return out.name
    finally:
        a = None  # the view must go before the segment can close
        source.close()


# -- contenders: context managers that start a warm pool and yield run(a, case) ---


@contextmanager
def procession_backend(name: str, workers: int) -> Iterator[Run]:
    import procession

    with procession.Executor(backend=name, workers=workers) as executor:

        def run(a: np.ndarray, case: str) -> list[Any]:
            return list(executor.map(TASKS[case], [a] * workers, chunksize=1))

        list(executor.map(abs, range(workers * 2), chunksize=1))
        yield run


@contextmanager
def procession_shared_array(workers: int) -> Iterator[Run]:
    """The array kept in shared memory (``shm.shared_array``), as a user who sends
    one array to many maps would keep it: made on the first call, then sent by name."""
    import procession
    from procession.serialization import shm

    kept: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    with procession.Executor(backend="process", workers=workers) as executor:

        def run(a: np.ndarray, case: str) -> list[Any]:
            if id(a) not in kept:
                kept[id(a)] = (a, shm.shared_array(a))
            shared = kept[id(a)][1]
            return list(executor.map(TASKS[case], [shared] * workers, chunksize=1))

        list(executor.map(abs, range(workers * 2), chunksize=1))
        try:
            yield run
        finally:
            kept.clear()


@contextmanager
def joblib_parallel(workers: int) -> Iterator[Run]:
    import joblib

    with joblib.Parallel(n_jobs=workers, max_nbytes="1M") as parallel:

        def run(a: np.ndarray, case: str) -> list[Any]:
            task = joblib.delayed(TASKS[case])
            return list(parallel(task(a) for _ in range(workers)))

        parallel(joblib.delayed(abs)(i) for i in range(workers * 2))
        yield run


@contextmanager
def loky_executor(workers: int) -> Iterator[Run]:
    from loky import get_reusable_executor

    executor = get_reusable_executor(max_workers=workers)

    def run(a: np.ndarray, case: str) -> list[Any]:
        return list(executor.map(TASKS[case], [a] * workers))

    list(executor.map(abs, range(workers * 2)))
    try:
        yield run
    finally:
        executor.shutdown(wait=True)


@contextmanager
def pool_map(workers: int) -> Iterator[Run]:
    with multiprocessing.get_context("forkserver").Pool(workers) as pool:

        def run(a: np.ndarray, case: str) -> list[Any]:
            return pool.map(TASKS[case], [a] * workers, chunksize=1)

        pool.map(abs, range(workers * 2))
        yield run


@contextmanager
def raw_shared_memory(workers: int) -> Iterator[Run]:
    with multiprocessing.get_context("forkserver").Pool(workers) as pool:
        kept: list[shared_memory.SharedMemory] = []

        def run(a: np.ndarray, case: str) -> list[Any]:
            source = shared_memory.SharedMemory(create=True, size=a.nbytes)
            try:
                np.ndarray(a.shape, dtype=a.dtype, buffer=source.buf)[...] = a
                answers = pool.map(raw_task, [(case, source.name, a.shape)] * workers, chunksize=1)
            finally:
                source.close()
                source.unlink()
            if case == "one way":
                return answers
            results = []
            for name in answers:
                segment = shared_memory.SharedMemory(name=name)
                segment.unlink()  # mapped: the memory lives while the array does
                kept.append(segment)
                results.append(np.ndarray(a.shape, dtype=a.dtype, buffer=segment.buf))
            return results

        pool.map(abs, range(workers * 2))
        try:
            yield run
        finally:
            kept.clear()


def contenders() -> dict[str, Callable[[int], AbstractContextManager[Run]]]:
    return {
        "procession process": lambda w: procession_backend("process", w),
        "procession loky": lambda w: procession_backend("loky", w),
        "procession multiprocessing": lambda w: procession_backend("multiprocessing", w),
        "procession shared_array": procession_shared_array,
        "joblib.Parallel (memmapping)": joblib_parallel,
        "loky executor": loky_executor,
        "multiprocessing.Pool.map": pool_map,
        "raw SharedMemory (limit)": raw_shared_memory,
    }


# -- measuring ------------------------------------------------------------------


def _rss_anon(pid: int) -> int:
    """Anonymous private memory of one process (a copy-on-write copy counts; mapped files not)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _shm_files(pid: int) -> int:
    """Bytes held by this run's files in /dev/shm: procession's segments, joblib's
    memmaps, SharedMemory segments (counted once, however many processes map them)."""
    owned = (f"procession-{pid}-", f"joblib_memmapping_folder_{pid}_", "psm_")
    total = 0
    try:
        entries = list(os.scandir("/dev/shm"))
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.startswith(owned):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir():
                for inner in os.scandir(entry.path):
                    total += inner.stat().st_blocks * 512
            else:
                total += entry.stat().st_blocks * 512
    return total


def footprint(pids: list[int]) -> int:
    """Memory the parent and its workers hold: anonymous memory plus shared-memory files."""
    return sum(_rss_anon(pid) for pid in pids) + _shm_files(os.getpid())


class PeakSampler:
    """Samples :func:`footprint` in a thread; ``peak`` is the highest seen."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        me = psutil.Process()
        self.pids = [me.pid, *(child.pid for child in me.children(recursive=True))]
        self.interval = interval
        self.baseline = footprint(self.pids)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, footprint(self.pids))
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, footprint(self.pids))


def _check(case: str, a: np.ndarray, results: list[Any]) -> None:
    if case == "one way":
        assert all(value == float(a.sum()) for value in results), results
    elif case == "round trip":
        assert all(np.array_equal(value, a) for value in results)
    else:
        assert all(np.array_equal(value, a + 1) for value in results)


@dataclass
class Row:
    name: str
    seconds: dict[str, float] = field(default_factory=dict)  # best of the repeats
    first: dict[str, float] = field(default_factory=dict)  # the first call (nothing cached)
    medians: dict[str, float] = field(default_factory=dict)
    peak_ratio: float | None = None  # one way: peak memory above baseline / array size
    error: str | None = None


def measure(
    name: str,
    factory: Callable[[int], AbstractContextManager[Run]],
    a: np.ndarray,
    workers: int,
    repeat: int,
) -> Row:
    row = Row(name)
    try:
        with factory(workers) as run:
            run(np.ones(16), "one way")  # the workers import numpy before the clock starts
            for case in CASES:
                started = time.perf_counter()
                answers = run(a, case)  # the first call: a tool that caches pays here
                row.first[case] = time.perf_counter() - started
                _check(case, a, answers)
                del answers
                times = []
                for _ in range(repeat):
                    started = time.perf_counter()
                    results = run(a, case)
                    times.append(time.perf_counter() - started)
                    del results
                row.seconds[case] = min(times)
                row.medians[case] = statistics.median(times)
            time.sleep(0.2)  # let freed memory settle before the baseline
            with PeakSampler() as sampler:
                run(a, "one way")
            row.peak_ratio = (sampler.peak - sampler.baseline) / a.nbytes
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {exc}"
    return row


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def report(rows: list[Row], mib: int, workers: int) -> str:
    lines = [
        f"{mib} MiB float64 array, {workers} tasks on {workers} warm workers, "
        f"best of the repeats (ms); 1st call = the first one-way call with this array; "
        f"peak = memory above idle during one way / array size",
        "",
        f"| {'contender':<30} | {'one way':>9} | {'1st call':>9} | {'round trip':>10} "
        f"| {'a + 1':>9} | {'peak':>5} |",
        f"|{'-' * 32}|{'-' * 10}:|{'-' * 10}:|{'-' * 11}:|{'-' * 10}:|{'-' * 6}:|",
    ]
    for row in rows:
        if row.error:
            lines.append(f"| {row.name:<30} | FAILED: {row.error}")
            continue
        peak = "-" if row.peak_ratio is None else f"{row.peak_ratio:.2f}"
        lines.append(
            f"| {row.name:<30} | {_ms(row.seconds.get('one way')):>9} "
            f"| {_ms(row.first.get('one way')):>9} "
            f"| {_ms(row.seconds.get('round trip')):>10} | {_ms(row.seconds.get('a + 1')):>9} "
            f"| {peak:>5} |"
        )
    by_name = {row.name: row for row in rows if not row.error}
    ours = by_name.get("procession process")
    joblib_row = by_name.get("joblib.Parallel (memmapping)")
    raw = by_name.get("raw SharedMemory (limit)")
    if ours and joblib_row and raw:
        lines.append("")
        for case in CASES:
            lines.append(
                f"{case}: joblib / procession = "
                f"{joblib_row.seconds[case] / ours.seconds[case]:.2f}x, "
                f"procession / raw SharedMemory = {ours.seconds[case] / raw.seconds[case]:.2f}x"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=100, help="array size in MiB (default 100)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", action="append", help="run only contenders containing this")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    a = np.random.default_rng(0).random(args.mib * (1 << 20) // 8)
    rows = []
    for name, factory in contenders().items():
        if args.only and not any(part in name for part in args.only):
            continue
        rows.append(measure(name, factory, a, args.workers, args.repeat))
        print(f"  measured {name}", file=sys.stderr, flush=True)
    print(report(rows, args.mib, args.workers))
    if args.json:
        payload = {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "mib": args.mib,
            "workers": args.workers,
            "repeat": args.repeat,
            "rows": [asdict(row) for row in rows],
        }
        with open(args.json, "w") as out:
            json.dump(payload, out, indent=2)


if __name__ == "__main__":
    main()
