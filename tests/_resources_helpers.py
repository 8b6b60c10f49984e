"""Task functions for tests/test_resources.py.

They live in an importable module (not in the test file) so that workers using
plain pickle (the ``multiprocessing`` backend) can load them by reference.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

MIB = 1024**2


def grow(mib: int, log: str | None = None) -> int:
    """Hold ``mib`` MiB of touched memory for a while (the watcher samples it)."""
    if log is not None:
        with open(log, "a") as attempts:
            attempts.write(f"{os.getpid()}\n")
    block = b"x" * (mib * MIB)  # written, so resident (a zeroed bytearray may not be)
    time.sleep(1.5 if mib >= 100 else 0.0)
    return len(block) // MIB


def grow_logged(args: tuple[int, str]) -> int:
    mib, log = args
    return grow(mib, log)


def grow_then_sigkill(mib: int) -> int:
    """Look like a victim of the kernel's OOM killer: big, then SIGKILL from outside."""
    block = b"x" * (mib * MIB)
    # Several idle-rate samples (every 0.5 s): one alone can be missed on a loaded machine.
    time.sleep(3.0)
    os.kill(os.getpid(), signal.SIGKILL)
    return len(block)


def pid_and_env(names: list[str]) -> tuple[int, dict[str, str | None]]:
    return os.getpid(), {name: os.environ.get(name) for name in names}


def exit_now(_: Any) -> None:
    os._exit(3)


def blas_threads(_: Any) -> dict[str, Any]:
    """What threadpoolctl sees in this worker once numpy (OpenBLAS) is loaded."""
    import numpy
    import threadpoolctl

    numpy.ones((4, 4)) @ numpy.ones((4, 4))
    pools = threadpoolctl.threadpool_info()
    return {
        "blas": sorted({pool["num_threads"] for pool in pools if pool["user_api"] == "blas"}),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
    }


_seen_in_initializer: dict[str, str | None] = {}


def remember_env(name: str) -> None:
    """An Executor initializer: records what the worker's environment held by then."""
    _seen_in_initializer[name] = os.environ.get(name)


def env_seen_by_initializer(name: str) -> str | None:
    return _seen_in_initializer.get(name, "<initializer did not run>")


def attempts(log: Path) -> list[int]:
    return [int(line) for line in log.read_text().split()] if log.exists() else []


def grow_in_a_child(mib: int) -> int:
    """The memory is a child process's: it counts in the worker's size."""
    import subprocess
    import sys

    code = f"import time\nblock = b'x' * ({mib} * {MIB})\ntime.sleep(30)\n"
    return subprocess.run([sys.executable, "-c", code], timeout=60).returncode
