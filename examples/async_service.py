"""A small asyncio service that offloads CPU work with ``procession.amap``.

The server speaks a line protocol over TCP: a client sends numbers, one per
line, and gets back ``n primes_below(n)`` for each, streamed as soon as each
is computed.  The counting is pure Python, CPU-bound work: it runs on the
workers of a procession backend, while the event loop keeps serving every
connection (a heartbeat task measures the longest stall of the loop).

- each connection's request stream is an *async source*: ``amap`` reads it
  lazily, as workers free up, and a client that disconnects stops its work;
- one-off calls use an ``Executor`` and ``asyncio.wrap_future``;
- standard library only, besides procession.

    python examples/async_service.py [--small] [--clients C] [--requests R] [--backend NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator

import procession
import procession.pools
from procession import amap  # imports procession's machinery now, not in the first request


def primes_below(n: int) -> int:
    """Count the primes below ``n`` by trial division: deliberately CPU-bound."""
    count = 0
    for candidate in range(2, n):
        divisor = 2
        while divisor * divisor <= candidate:
            if candidate % divisor == 0:
                break
            divisor += 1
        else:
            count += 1
    return count


async def numbers_from(reader: asyncio.StreamReader) -> AsyncIterator[int]:
    """The request stream of one connection (ends when the client stops sending)."""
    while line := await reader.readline():
        if line.strip():
            yield int(line)


class Service:
    def __init__(self, backend: str, workers: int) -> None:
        self.backend = backend
        self.workers = workers
        self.served = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Results go back in request order, each as soon as it (and those
        # before it) are done; a disconnect cancels this task and its work.
        try:
            async for n, count in amap(
                _with_input, numbers_from(reader), backend=self.backend, workers=self.workers
            ):
                writer.write(f"{n} {count}\n".encode())
                await writer.drain()
                self.served += 1
        finally:
            writer.close()


def _with_input(n: int) -> tuple[int, int]:
    return n, primes_below(n)


async def client(port: int, requests: list[int]) -> dict[int, int]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write("".join(f"{n}\n" for n in requests).encode())
    await writer.drain()
    writer.write_eof()
    answers = {}
    while line := await reader.readline():
        n, count = map(int, line.split())
        answers[n] = count
    writer.close()
    await writer.wait_closed()
    return answers


async def heartbeat(stalls: list[float], stop: asyncio.Event) -> None:
    """Record the gaps between ticks: a blocked loop shows up as a long one."""
    last = time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(0.01)
        now = time.monotonic()
        stalls.append(now - last)
        last = now


async def serve_and_query(args: argparse.Namespace) -> int:
    # At start-up, off the loop: import the backend and make its (warm, shared)
    # pool, so the first request does not pay for either on the loop.
    await asyncio.to_thread(procession.pools.shared_backend, args.backend, args.workers)
    service = Service(args.backend, args.workers)
    server = await asyncio.start_server(service.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gaps: list[float] = []
    stop = asyncio.Event()
    beat = asyncio.create_task(heartbeat(gaps, stop))

    base = 2_000 if args.small else 40_000
    batches = [
        [base + 97 * (c * args.requests + i) for i in range(args.requests)]
        for c in range(args.clients)
    ]
    started = time.perf_counter()
    answers = await asyncio.gather(*(client(port, batch) for batch in batches))
    seconds = time.perf_counter() - started

    stop.set()
    await beat

    # A single call: an Executor's future, awaited without blocking the loop.
    # Starting and stopping a pool takes a moment: do both off the loop (a real
    # service would make the Executor once, at start-up).
    executor = await asyncio.to_thread(procession.Executor, args.backend, 1)
    largest = max(n for batch in batches for n in batch)
    try:
        single = await asyncio.wrap_future(executor.submit(primes_below, largest))
    finally:
        await asyncio.to_thread(executor.shutdown)
    server.close()
    await server.wait_closed()

    wrong = [
        n
        for batch, got in zip(batches, answers, strict=True)
        for n in batch
        if got.get(n) != primes_below(n)
    ]
    total = sum(len(batch) for batch in batches)
    print(
        f"served {service.served}/{total} requests from {args.clients} clients in "
        f"{seconds:.2f}s on backend {args.backend!r} ({args.workers} workers)"
    )
    print(f"primes below {largest}: {single} (one Executor call via asyncio.wrap_future)")
    print(f"longest event-loop stall while serving: {max(gaps, default=0.0) * 1e3:.1f} ms")
    print("all answers correct" if not wrong else f"WRONG answers for {wrong}")
    return 0 if not wrong and service.served == total and single == primes_below(largest) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--requests", type=int, default=None, help="numbers per client")
    parser.add_argument("--backend", default="process", help="a procession backend name")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if args.requests is None:
        args.requests = 4 if args.small else 20
    return asyncio.run(serve_and_query(args))


if __name__ == "__main__":
    sys.exit(main())
