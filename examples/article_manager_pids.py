"""The article's first program: child processes report their PIDs, with procession.

The article (multiprocessing, then called ``processing``) started a
``Manager`` server, handed each of ten ``Process`` objects a proxy to a shared
list, and had every child append ``os.getpid()`` to it::

    manager = Manager()
    pids = manager.list()
    processes = [Process(target=f, args=(pids,)) for _ in range(10)]
    for p in processes: p.start()
    for p in processes: p.join()
    print(pids)

What changed: nothing is shared.  Each task *returns* its PID and
``procession.map`` hands the results back in order, so there is no Manager
server process, no proxy round-trip per append, and no start/join
bookkeeping.  Tasks run on a warm pool of workers (one per CPU by default)
instead of one new process per task, which is why PIDs repeat.

Run: python examples/article_manager_pids.py [--small] [--backend NAME]
"""

from __future__ import annotations

import argparse
import os

import procession


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run (used by the tests)")
    parser.add_argument("--backend", default=None, help="backend name (default: process)")
    args = parser.parse_args()
    tasks = 4 if args.small else 10

    # The lambda is fine: procession sends functions with cloudpickle.
    pids = list(
        procession.map(lambda _: os.getpid(), range(tasks), backend=args.backend, chunksize=1)
    )

    print(f"parent pid {os.getpid()}; {tasks} tasks reported pids {pids}")
    print(f"{len(set(pids))} distinct worker processes did the work")


if __name__ == "__main__":
    main()
