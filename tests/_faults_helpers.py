"""Task functions and child scripts for tests/test_faults.py.

They live in an importable module (not in the test file) so that workers using
plain pickle (the ``multiprocessing`` backend) can load them by reference.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any


class UnpicklableError(Exception):
    """Cannot be pickled in the worker: it holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class UnloadableError(Exception):
    """Pickles fine, but unpickling calls ``UnloadableError(message)``, which fails."""

    def __init__(self, first: str, second: str) -> None:
        super().__init__(f"{first}/{second}")


def act(item: tuple[Any, ...]) -> Any:
    """Do what ``item`` says: ``("ok", value)``, ``("kill",)``, ``("hang",)`` and so on."""
    kind = item[0]
    if kind == "ok":
        return item[1]
    if kind == "sleep":
        time.sleep(item[1])
        return item[2]
    if kind == "record":  # ("record", path, value, seconds): note each execution
        _, path, value, seconds = item
        with open(path, "a") as log:
            log.write(f"{value}\n")
        time.sleep(seconds)
        return value
    if kind == "kill":
        time.sleep(item[1] if len(item) > 1 else 0)
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "exit":
        time.sleep(item[2] if len(item) > 2 else 0)
        os._exit(item[1])
    if kind == "segv":
        time.sleep(item[1] if len(item) > 1 else 0)
        ctypes.string_at(0)
    if kind == "hang":
        time.sleep(60)
        return None
    if kind == "crash_once":  # ("crash_once", marker, value): dies on the first attempt only
        marker = Path(item[1])
        if not marker.exists():
            marker.write_text("crashed once")
            os._exit(5)
        return item[2]
    if kind == "raise":
        raise ValueError(item[1])
    if kind == "raise_unpicklable":
        raise UnpicklableError(item[1])
    if kind == "raise_unloadable":
        raise UnloadableError(item[1], "second")
    if kind == "sysexit":
        raise SystemExit(item[1])
    if kind == "return_lock":
        return threading.Lock()
    if kind == "pid":
        time.sleep(item[1] if len(item) > 1 else 0)
        return os.getpid()
    raise AssertionError(f"unknown action {item!r}")


def init_raises(message: str) -> None:
    raise RuntimeError(message)


# Child scripts: argv[1] is the backend name.  Each prints one line once its map
# is under way, so the test knows when to strike.

CTRL_C_SCRIPT = """
import sys, time
import procession

if __name__ == "__main__":
    results = procession.map(time.sleep, [0.01, 30, 30, 30], backend=sys.argv[1], workers=2,
                             chunksize=1)
    next(results)
    print("ready", flush=True)
    list(results)
    print("finished", flush=True)
"""

HANG_THEN_DIE_SCRIPT = """
import sys, time
import procession

if __name__ == "__main__":
    backend = procession.create_backend(sys.argv[1], workers=2)
    results = procession.map(time.sleep, [0.01, 60, 60], backend=backend, chunksize=1)
    next(results)
    time.sleep(0.2)
    print(" ".join(str(pid) for pid in sorted(backend.worker_pids())), flush=True)
    list(results)
"""

NORMAL_EXIT_SCRIPT = """
import sys
import procession

if __name__ == "__main__":
    assert list(procession.map(abs, range(-20, 0), backend=sys.argv[1], workers=2)) == list(
        range(20, 0, -1)
    )
    backend = procession.create_backend(sys.argv[1], workers=2)
    assert list(procession.map(abs, [-1, -2], backend=backend)) == [1, 2]
    print(" ".join(str(pid) for pid in sorted(backend.worker_pids())), flush=True)
    # No shutdown on purpose: exiting must stop both pools.
"""


# -- tests/test_edges.py ------------------------------------------------------------


def inner_pid(_: object) -> int:
    return os.getpid()


def nested_default(n: int) -> tuple[int, bool, bool]:
    """A map and an Executor inside a task: both run inline, in this very process."""
    import procession

    pids = set(procession.map(inner_pid, range(n)))
    with procession.Executor() as ex:
        pids.add(ex.submit(inner_pid, 0).result())
    return n, pids == {os.getpid()}, procession.worker.in_worker()


def nested_threads(n: int) -> int:
    """An explicit nested threads map: its own pool, never the caller's."""
    import procession

    return sum(procession.map(abs, range(-n, 0), backend="threads", workers=2))


def nested_explicit(name: str) -> str:
    """Ask for a process pool inside a task: the error must say why and what to do."""
    import procession

    try:
        list(procession.map(abs, [1], backend=name))
    except procession._nesting.NestedParallelismError as exc:
        return str(exc)
    return "no error"


def raise_keyboard_interrupt(_: object) -> None:
    raise KeyboardInterrupt("raised by the task")


def kill_some(item: tuple[int, float]) -> int:
    """Fault injection: SIGKILL this worker with probability ``item[1]``, else return."""
    import random

    value, probability = item
    if random.random() < probability:
        os.kill(os.getpid(), signal.SIGKILL)
    return value


EXIT_DRAIN_SCRIPT = """
import sys, time
import procession
import procession.backends.registry

def note(path, i):
    time.sleep(0.02)
    with open(path, "a") as log:
        log.write(f"{i}\\n")
    return i

if __name__ == "__main__":
    backend, mode, path = sys.argv[1:4]
    limit = procession.backends.registry.get_backend_class(backend).max_workers
    ex = procession.Executor(backend=backend, workers=min(2, limit or 2))
    futures = [ex.submit(note, path, i) for i in range(20)]
    cancelled = sum(f.cancel() for f in futures[10:])
    print(cancelled, flush=True)
    if mode == "shutdown-nowait":
        ex.shutdown(wait=False)
    # mode "no-shutdown": the script just ends
"""


def busy_identity(item: int) -> int:
    """About 50 microseconds of work: a 100k-item map takes seconds, not minutes."""
    deadline = time.perf_counter() + 0.00005
    while time.perf_counter() < deadline:
        pass
    return item


def start_grandchild(_: object) -> int:
    """A task that starts a long-lived child process and returns without waiting."""
    import subprocess

    child = subprocess.Popen(["sleep", "60"])
    return child.pid


LEFTOVERS_SCRIPT = """
import multiprocessing.util, sys, time
import procession

if __name__ == "__main__":
    backend = procession.create_backend(sys.argv[1], workers=2)
    results = procession.map(time.sleep, [0.01, 60, 60], backend=backend, chunksize=1)
    next(results)
    time.sleep(0.5)
    folder = getattr(backend, "_directory", "") or multiprocessing.util.get_temp_dir()
    print(folder, flush=True)
    list(results)
"""


SUBMIT_AT_EXIT_SCRIPT = """
import atexit, sys
import procession
import procession.backends.registry

@atexit.register
def submit_late():
    try:
        ex.submit(abs, -1)
    except RuntimeError as exc:
        print("refused:", exc, flush=True)

if __name__ == "__main__":
    limit = procession.backends.registry.get_backend_class(sys.argv[1]).max_workers
    ex = procession.Executor(backend=sys.argv[1], workers=min(2, limit or 2))
    print(ex.submit(abs, -42).result(), flush=True)
"""
