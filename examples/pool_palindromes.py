"""The article's ``Pool.map`` palindrome search, with procession.

The article built the whole word list in the parent, cut it into chunks and
sent them to a pool::

    words = [random_word() for _ in range(N)]        # all N words in memory
    chunks = [words[i:i + size] for i in range(0, N, size)]
    results = Pool(4).map(find_palindromes, chunks)  # every word pickled and sent

so shipping the words cost more than searching them.  Two things changed:

1. ``procession.map`` takes a *generator*: chunks are produced lazily, only as
   fast as the workers free up, so the list never exists (memory stays flat).
2. ``search_palindromes`` ships no words at all: each worker regenerates its
   own index range from a recipe (word i depends only on the seed and i) and
   sends back only the palindromes.  Same answer, a fraction of the traffic.

Run: python examples/pool_palindromes.py [--small] [--backend NAME] [--workers N]
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Iterator

import procession
from procession.workloads.palindromes import find_palindromes, generate_words, search_palindromes


def chunks(words: Iterator[str], size: int) -> Iterator[list[str]]:
    """Lists of ``size`` words, made lazily."""
    while batch := list(itertools.islice(words, size)):
        yield batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run (used by the tests)")
    parser.add_argument("--backend", default=None, help="backend name (default: process)")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    count, length, seed = (20_000 if args.small else 2_000_000), 5, 42

    # 1. The article's shape: ship chunks of words, but from a generator.
    started = time.perf_counter()
    shipped: list[str] = []
    for found in procession.map(
        find_palindromes,
        chunks(generate_words(count, length, seed), 10_000),
        backend=args.backend,
        workers=args.workers,
    ):
        shipped.extend(found)
    t_shipped = time.perf_counter() - started

    # 2. Ship nothing: workers generate their own words from a recipe.
    started = time.perf_counter()
    generated = search_palindromes(
        count, length, seed=seed, backend=args.backend, workers=args.workers
    )
    t_generated = time.perf_counter() - started

    assert shipped == generated, "both ways must find the same palindromes"
    print(
        f"{len(generated)} palindromes among {count:,} random {length}-letter words "
        f"(first: {', '.join(generated[:5])})"
    )
    print(f"words shipped to workers:     {t_shipped:.3f} s")
    print(f"words generated in workers:   {t_generated:.3f} s")


if __name__ == "__main__":
    main()
