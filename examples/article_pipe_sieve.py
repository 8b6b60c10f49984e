"""The article's parallel sieve: a chain of processes linked by Pipes, made correct.

Standard library only, for comparison with ``pipeline_sieve.py``.  Each process
owns a contiguous range ``[first, last)`` of ``[0, n)``.  Batches of primes
arrive from upstream; the process crosses off their multiples in its range and
forwards the batch downstream.  When upstream signals the end (``None``), every
number left in its range whose smaller prime factors would all be its own is
found by walking the range in order, crossing off each new prime's multiples;
those primes go downstream too, then ``None``.  The last process sends to the
parent, which therefore receives every prime, in order.

What "made correct" means here (the usual pitfalls of this program):

- the parent reads the pipe *before* joining the processes: a process blocked
  on a full pipe never exits, so joining first deadlocks as soon as the primes
  no longer fit in the pipe's buffer;
- 0 and 1 are not primes, and a range that starts below 2 is handled;
- bounds are half-open, and crossing starts at ``max(p*p, first multiple of p
  in the range)``, so no number at a range edge is skipped or counted twice;
- every process gets only the two pipe ends it uses and closes them, and the
  parent closes its copies, so a dead neighbour shows up as ``EOFError``
  instead of a hang;
- primes travel in batches, one message per batch, not one message per prime;
- the result is checked against a sequential sieve.

    python examples/article_pipe_sieve.py [--small] [-n N] [--processes P]
"""

from __future__ import annotations

import argparse
import sys
import time
from itertools import compress
from multiprocessing import Pipe, Process
from multiprocessing.connection import Connection


def sequential_sieve(n: int) -> list[int]:
    """All primes below ``n`` (the reference)."""
    if n < 3:
        return []
    flags = bytearray(b"\x01") * n
    flags[0] = flags[1] = 0
    p = 2
    while p * p < n:
        if flags[p]:
            flags[p * p :: p] = bytes(len(range(p * p, n, p)))
        p += 1
    return list(compress(range(n), flags))


def sieve_stage(first: int, last: int, upstream: Connection | None, downstream: Connection) -> None:
    """One process of the chain (see the module docstring)."""
    lo = max(first, 2)
    flags = bytearray(b"\x01") * max(last - lo, 0)

    def cross(p: int) -> None:
        start = max(p * p, -(-lo // p) * p)
        if start < last:
            flags[start - lo :: p] = bytes(len(range(start - lo, last - lo, p)))

    if upstream is not None:
        while True:
            batch = upstream.recv()
            if batch is None:
                break
            for p in batch:
                if p * p >= last:
                    break  # batches are sorted: no larger prime has a multiple to cross
                cross(p)
            downstream.send(batch)
        upstream.close()
    own: list[int] = []
    for offset in range(len(flags)):
        if flags[offset]:
            p = lo + offset
            own.append(p)
            cross(p)
    downstream.send(own)
    downstream.send(None)
    downstream.close()


def parallel_sieve(n: int, processes: int) -> list[int]:
    """Primes below ``n`` from a chain of ``processes`` processes."""
    step = -(-n // processes)
    bounds = [(min(k * step, n), min((k + 1) * step, n)) for k in range(processes)]
    workers: list[Process] = []
    upstream: Connection | None = None
    for first, last in bounds:
        receive, send = Pipe(duplex=False)
        worker = Process(target=sieve_stage, args=(first, last, upstream, send))
        worker.start()
        # The child has its own copies now; the parent keeps only the last reader.
        send.close()
        if upstream is not None:
            upstream.close()
        upstream = receive
        workers.append(worker)
    assert upstream is not None
    primes: list[int] = []
    try:
        while True:  # read everything first, then join (joining first can deadlock)
            batch = upstream.recv()
            if batch is None:
                break
            primes.extend(batch)
    finally:
        upstream.close()
        for worker in workers:
            worker.join()
    failed = [w.exitcode for w in workers if w.exitcode != 0]
    if failed:
        raise RuntimeError(f"sieve processes failed with exit codes {failed}")
    return primes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run")
    parser.add_argument("-n", type=int, default=None, help="find the primes below n")
    parser.add_argument("--processes", type=int, default=4)
    args = parser.parse_args(argv)
    n = args.n if args.n is not None else (20_000 if args.small else 5_000_000)
    processes = 3 if args.small else args.processes

    started = time.perf_counter()
    primes = parallel_sieve(n, processes)
    seconds = time.perf_counter() - started
    agrees = primes == sequential_sieve(n)
    print(f"{len(primes)} primes below {n} from a chain of {processes} processes in {seconds:.3f}s")
    print(f"largest: {primes[-1] if primes else None}; agrees with the sequential sieve: {agrees}")
    return 0 if agrees else 1


if __name__ == "__main__":
    sys.exit(main())
