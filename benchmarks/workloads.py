"""The reference workloads, measured side by side in one run (issue 6).

    uv run --group bench python benchmarks/workloads.py [--backend process] [--workers 2]
                                                        [--repeat 3] [--quick] [--json FILE]

What it measures (best of --repeat runs each; pools are started before the clock;
each parallel case is timed in alternation with its sequential baseline, so both
see the same machine):

- palindromes among 8,000,000 random 5-letter words:
  ``search_palindromes`` on N workers (words generated inside the workers) against
  the same kernel sequential, the article's way sequential (``find_palindromes``
  over ``generate_words``), and shipping the words to the workers (the article's
  ``Pool.map`` over chunks of a word list, with multiprocessing and with procession).
- primes up to 10**8: ``count_primes`` and ``primes_up_to`` on N workers against
  the same segmented sieve sequential, and primesieve (C++) as the physical limit.
- primes up to 10**7: the article's ``prime_sieve`` against the segmented sieve.

primesieve is in the ``bench`` dependency group; it builds against the system
library (Debian: ``apt-get install libprimesieve-dev``).  Without it those rows
say "not installed".
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import procession
from procession.api import resolve_backend
from procession.workloads import palindromes, sieve

LENGTH = 5
SEED = 2009


def best_of(repeat: int, fn: Callable[[], Any]) -> tuple[Any, float]:
    result, best = None, float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return result, best


def word_chunks(count: int, size: int) -> Iterator[list[str]]:
    words = palindromes.generate_words(count, LENGTH, seed=SEED)
    while batch := list(itertools.islice(words, size)):
        yield batch


def article_pool_map(count: int, workers: int) -> list[str]:
    """The article's program: a list of words in the parent, chunks shipped to a Pool."""
    words = list(palindromes.generate_words(count, LENGTH, seed=SEED))
    size = 50_000
    chunks = [words[i : i + size] for i in range(0, len(words), size)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        results = pool.map(palindromes.find_palindromes, chunks)
    return [word for part in results for word in part]


def shipped_with_procession(count: int, backend: str, workers: int) -> list[str]:
    found: list[str] = []
    for part in procession.map(
        palindromes.find_palindromes,
        word_chunks(count, 50_000),
        backend=backend,
        workers=workers,
    ):
        found.extend(part)
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, help="backend (default: the default one)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)

    words, limit, small_limit = 8_000_000, 10**8, 10**7
    if args.quick:
        words, limit, small_limit = 200_000, 10**6, 10**5
    backend = args.backend or procession.api.default_backend_name()
    workers, repeat = args.workers, args.repeat
    pool = resolve_backend(backend, workers)
    list(procession.map(abs, range(4 * workers), backend=backend, workers=workers, chunksize=1))

    rows: list[dict[str, Any]] = []

    def record(
        group: str,
        label: str,
        fn: Callable[[], Any],
        baseline: float | None = None,
        check: Any = None,
    ) -> float:
        result, seconds = best_of(repeat, fn)
        if check is not None and result != check:
            raise SystemExit(f"{label}: wrong answer")
        rows.append(
            {
                "group": group,
                "case": label,
                "seconds": seconds,
                "speedup": (baseline / seconds) if baseline else None,
            }
        )
        print(
            f"  {label:<58} {seconds:8.3f} s"
            + (f"  {baseline / seconds:5.2f}x" if baseline else ""),
            flush=True,
        )
        return seconds

    def record_pair(
        group: str,
        seq_label: str,
        seq_fn: Callable[[], Any],
        par_label: str,
        par_fn: Callable[[], Any],
        check: Any,
    ) -> float:
        """Sequential and parallel timed in alternation, so that both see the same
        machine (other jobs come and go); the best of each is kept."""
        best = {seq_label: float("inf"), par_label: float("inf")}
        for _ in range(repeat):
            for label, fn in ((seq_label, seq_fn), (par_label, par_fn)):
                started = time.perf_counter()
                result = fn()
                best[label] = min(best[label], time.perf_counter() - started)
                if result != check:
                    raise SystemExit(f"{label}: wrong answer")
        seq_seconds = best[seq_label]
        for label, seconds, baseline in (
            (seq_label, seq_seconds, None),
            (par_label, best[par_label], seq_seconds),
        ):
            rows.append(
                {
                    "group": group,
                    "case": label,
                    "seconds": seconds,
                    "speedup": (baseline / seconds) if baseline else None,
                }
            )
            print(
                f"  {label:<58} {seconds:8.3f} s"
                + (f"  {baseline / seconds:5.2f}x" if baseline else ""),
                flush=True,
            )
        return seq_seconds

    par = f"{backend} x{pool.workers}"
    print(
        f"Python {platform.python_version()} on {platform.platform()}, {os.cpu_count()} CPUs; "
        f"backend {backend!r}, {pool.workers} workers; best of {repeat}"
    )

    group = f"palindromes, {words:,} words of {LENGTH} letters"
    print(group)
    expected = palindromes.WordSource(LENGTH, SEED).palindromes(0, words)
    seq = record_pair(
        group,
        "same kernel, sequential (in process)",
        lambda: palindromes.WordSource(LENGTH, SEED).palindromes(0, words),
        f"search_palindromes, {par} (no words shipped)",
        lambda: palindromes.search_palindromes(
            words, LENGTH, seed=SEED, backend=backend, workers=workers
        ),
        expected,
    )
    record(
        group,
        "article's way, sequential: find_palindromes(generate_words)",
        lambda: palindromes.find_palindromes(palindromes.generate_words(words, LENGTH, seed=SEED)),
        seq,
        expected,
    )
    record(
        group,
        f"words shipped: procession.map over chunks, {par}",
        lambda: shipped_with_procession(words, backend, workers),
        seq,
        expected,
    )
    record(
        group,
        f"words shipped: article's multiprocessing.Pool.map x{workers}",
        lambda: article_pool_map(words, workers),
        seq,
        expected,
    )

    try:
        import primesieve
    except ImportError:
        primesieve = None

    group = f"primes up to {limit:,}"
    print(group)
    count = sieve.segmented_count(limit)
    count_seq = record_pair(
        group,
        "count: segmented sieve, sequential",
        lambda: sieve.segmented_count(limit),
        f"count: count_primes, {par}",
        lambda: sieve.count_primes(limit, backend=backend, workers=workers),
        count,
    )
    expected_primes = sieve.segmented_sieve(limit)
    seq = record_pair(
        group,
        "primes: segmented sieve, sequential (array)",
        lambda: sieve.segmented_sieve(limit),
        f"primes: primes_up_to, {par} (array)",
        lambda: sieve.primes_up_to(limit, backend=backend, workers=workers),
        expected_primes,
    )
    del expected_primes
    if primesieve is not None:
        primesieve.set_num_threads(workers)
        record(
            group,
            f"count: primesieve (C++, {workers} threads)",
            lambda: primesieve.count_primes(limit),
            count_seq,
            count,
        )
        record(
            group,
            f"primes: primesieve (C++, {workers} threads)",
            lambda: len(primesieve.primes(limit)),
            seq,
            count,
        )
    else:
        print("  primesieve: not installed (uv sync --group bench)")

    group = f"primes up to {small_limit:,}"
    print(group)
    oracle = sieve.prime_sieve(small_limit)
    seq = record(
        group,
        "the article's prime_sieve (list of flags), sequential",
        lambda: sieve.prime_sieve(small_limit),
        check=oracle,
    )
    record(
        group,
        "segmented sieve, sequential",
        lambda: sieve.segmented_sieve(small_limit).tolist(),
        seq,
        oracle,
    )
    record(
        group,
        f"primes_up_to, {par}",
        lambda: sieve.primes_up_to(small_limit, backend=backend, workers=workers).tolist(),
        seq,
        oracle,
    )

    if args.json_path:
        payload = {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "backend": backend,
            "workers": pool.workers,
            "repeat": repeat,
            "rows": rows,
        }
        with open(args.json_path, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2)
        print(f"wrote {args.json_path}")
    procession.api.shutdown_shared_backends()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
