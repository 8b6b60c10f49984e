"""Expensive-to-build objects, built once per worker instead of once per task.

The article ended on this pain: "C++ extension objects that are expensive to
construct" cannot be pickled, so each task rebuilt them (or people hand-wrote
a serialize/factory layer).  Here a ``SpellChecker`` stands for such an
object: building it takes a measurable time (it generates and indexes a word
list, then pays a fixed "load a native library" cost), and it holds a lock,
so it cannot be pickled at all.

Two ways to check many batches of words in parallel:

1. per task: every task builds its own checker (what people do when the
   object does not pickle): as many builds as tasks;
2. ``procession.Recipe(SpellChecker, ...)``: the task carries the *recipe*;
   each worker builds the checker on first use and reuses it for every later
   task and every later ``map`` on the same pool: at most one build per worker.

Each build appends a line to a log file, so the counts printed below are
real builds in the worker processes, not estimates.

Run: python examples/expensive_objects.py [--small] [--backend NAME] [--workers N]
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import tempfile
import threading
import time
from pathlib import Path

import procession


class SpellChecker:
    """Costly to build, impossible to pickle (it holds a lock)."""

    def __init__(self, vocabulary_size: int, seed: int, log: str, load_seconds: float) -> None:
        started = time.perf_counter()
        rng = random.Random(seed)
        letters = "abcdefghij"
        self.words = {
            "".join(rng.choice(letters) for _ in range(5)) for _ in range(vocabulary_size)
        }
        time.sleep(load_seconds)  # stands for loading a native library / model file
        self.lock = threading.Lock()
        self.build_seconds = time.perf_counter() - started
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\n")

    def known(self, words: list[str]) -> int:
        return sum(word in self.words for word in words)


def check_building_each_time(settings: tuple[int, int, str, float], batch: list[str]) -> int:
    """Approach 1: the task builds its own checker."""
    return SpellChecker(*settings).known(batch)


def check_with(checker: SpellChecker, batch: list[str]) -> int:
    """Approach 2: the checker arrives built (from the Recipe, once per worker)."""
    return checker.known(batch)


def batches(count: int, size: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [
        ["".join(rng.choice("abcdefghij") for _ in range(5)) for _ in range(size)]
        for _ in range(count)
    ]


def count_builds(log: Path) -> tuple[int, int]:
    """(builds, distinct worker processes that built)."""
    pids = log.read_text().split() if log.exists() else []
    return len(pids), len(set(pids))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run (used by the tests)")
    parser.add_argument("--backend", default=None, help="backend name (default: process)")
    parser.add_argument("--workers", type=int, default=2, help="worker count (default 2)")
    args = parser.parse_args()
    tasks = 8 if args.small else 24
    vocabulary = 20_000 if args.small else 200_000
    load_seconds = 0.05 if args.small else 0.2
    work = batches(tasks, 200, seed=1)

    with tempfile.TemporaryDirectory() as folder:
        naive_log = Path(folder) / "naive.log"
        recipe_log = Path(folder) / "recipe.log"
        settings = (vocabulary, 7, str(naive_log), load_seconds)

        started = time.perf_counter()
        naive = list(
            procession.map(
                functools.partial(check_building_each_time, settings),
                work,
                backend=args.backend,
                workers=args.workers,
                chunksize=1,
            )
        )
        naive_seconds = time.perf_counter() - started

        checker = procession.Recipe(SpellChecker, vocabulary, 7, str(recipe_log), load_seconds)
        task = functools.partial(check_with, checker)
        started = time.perf_counter()
        # Two maps on the same warm pool: the second one builds nothing.
        first = list(
            procession.map(task, work, backend=args.backend, workers=args.workers, chunksize=1)
        )
        second = list(
            procession.map(task, work, backend=args.backend, workers=args.workers, chunksize=1)
        )
        recipe_seconds = time.perf_counter() - started

        naive_builds, _ = count_builds(naive_log)
        recipe_builds, recipe_workers = count_builds(recipe_log)

    if not (naive == first == second):
        print("results differ between the two approaches!")
        return 1
    print(f"{tasks} batches of 200 words, {sum(first)} known words, workers={args.workers}")
    print(
        f"  build per task:     {naive_builds:3d} builds for {tasks} tasks  {naive_seconds:6.2f} s"
    )
    print(
        f"  Recipe, two maps:   {recipe_builds:3d} builds for {2 * tasks} tasks "
        f"{recipe_seconds:6.2f} s  (built once in each of {recipe_workers} process(es))"
    )
    if recipe_builds != recipe_workers or recipe_builds > max(args.workers, 1):
        print("unexpected: a worker built the recipe more than once")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
