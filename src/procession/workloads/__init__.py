"""The reference workloads: the article's two measurements, made parallel.

- :mod:`procession.workloads.palindromes`: find palindromes among random
  words that each worker generates itself from a recipe (no word list shipped).
- :mod:`procession.workloads.sieve`: primes by a segmented sieve of
  Eratosthenes, segments in parallel, base primes built once per worker.

Both return exactly what their sequential oracles return, on every backend
and for every worker count; the tests check that with hypothesis.
"""

from __future__ import annotations

__all__ = ["palindromes", "sieve"]
