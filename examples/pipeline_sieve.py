"""The article's Pipe-based sieve (``article_pipe_sieve.py``) with procession's Pipeline.

What changed:

- no ``Pipe``, ``Process``, sentinels or join-order pitfalls: the stages are
  linked by bounded queues that procession manages, an error in any stage is
  raised here as its own type, and leaving the ``with`` block stops everything;
- the primes found upstream still flow downstream to the stages that need
  them, but a range needs only the primes up to the square root of its end:
  the head of the pipeline sends each range just those (``range_messages``),
  so the ranges are sieved *at the same time* on the backend's workers instead
  of each waiting for every range before it;
- the backend is a choice (``--backend threads``, ``process``, ...), not
  hard-wired processes.

    python examples/pipeline_sieve.py [--small] [-n N] [--ranges R] [--backend NAME]
"""

from __future__ import annotations

import argparse
import sys
import time

import procession
from procession.workloads.sieve_pipeline import (
    check_ranges,
    collect_primes,
    range_messages,
    sieve_range,
)


def sequential_sieve(n: int) -> list[int]:
    """All primes below ``n`` (the reference)."""
    flags = bytearray(b"\x01") * max(n, 2)
    flags[0] = flags[1] = 0
    p = 2
    while p * p < n:
        if flags[p]:
            flags[p * p :: p] = bytes(len(range(p * p, n, p)))
        p += 1
    return [i for i in range(n) if flags[i]]


def pipeline_sieve(n: int, parts: int, backend: str | None, workers: int | None) -> list[int]:
    step = -(-n // parts)
    ranges = check_ranges([(min(k * step, n), min((k + 1) * step, n)) for k in range(parts)])
    pipe = procession.Pipeline(range_messages(ranges)).map(
        sieve_range, backend=backend, workers=workers
    )
    primes: list[int] = []
    with pipe.run() as found:  # one list of primes per range, in range order
        for chunk in found:
            primes.extend(chunk)
    return primes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run")
    parser.add_argument("-n", type=int, default=None, help="find the primes below n")
    parser.add_argument("--ranges", type=int, default=16, help="how many ranges to split into")
    parser.add_argument("--backend", default=None, help="a backend name (default: procession's)")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    n = args.n if args.n is not None else (20_000 if args.small else 5_000_000)
    backend = args.backend or ("threads" if args.small else None)
    workers = 2 if args.small and args.workers is None else args.workers

    started = time.perf_counter()
    primes = pipeline_sieve(n, args.ranges, backend, workers)
    seconds = time.perf_counter() - started
    step = -(-n // args.ranges)
    same = primes == collect_primes(
        [(min(k * step, n), min((k + 1) * step, n)) for k in range(args.ranges)],
        backend=backend,
        workers=workers,
    )
    agrees = same and primes == sequential_sieve(n)
    print(
        f"{len(primes)} primes below {n} from {args.ranges} ranges on "
        f"backend {backend or procession.api.default_backend_name()!r} in {seconds:.3f}s"
    )
    print(f"largest: {primes[-1] if primes else None}; agrees with the sequential sieve: {agrees}")
    procession.api.shutdown_shared_backends()
    return 0 if agrees else 1


if __name__ == "__main__":
    sys.exit(main())
