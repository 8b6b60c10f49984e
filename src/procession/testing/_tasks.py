"""Functions the conformance suite runs in workers.

They live in an importable module (not in the test class) so that every
serializer can send them, ``pickle`` included: workers import them by name.
Keep this module free of pytest and hypothesis imports; workers load it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from typing import Any

from procession.serialization.recipes import Recipe

__all__ = [
    "ConformanceError",
    "OpaqueHandle",
    "Token",
    "add",
    "crash_once",
    "describe_handle",
    "exit_on",
    "fail_on",
    "get_initialized",
    "make_token",
    "pid_of",
    "reduce_opaque_handle",
    "set_initialized",
    "sigkill_on",
    "sleep_on",
    "square",
    "token_of",
]


class ConformanceError(Exception):
    """A user exception type: it must come back as itself, not wrapped."""


def square(x: int) -> int:
    return x * x


def add(x: int, y: int) -> int:
    return x + y


def pid_of(_: object) -> int:
    return os.getpid()


def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise ConformanceError(f"bad item {x}")
    return x


def exit_on(x: int, bad: int) -> int:
    if x == bad:
        os._exit(3)
    return x


def sigkill_on(x: int, bad: int) -> int:
    if x == bad:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(30)  # the signal is asynchronous; never return normally
    return x


def crash_once(x: int, bad: int, marker: str) -> int:
    """Crash the worker the first time ``bad`` is seen (across processes: a marker file)."""
    if x == bad:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return x
        os.close(fd)
        os._exit(3)
    return x


def sleep_on(x: int, bad: int, seconds: float) -> int:
    if x == bad:
        time.sleep(seconds)
    return x


class Token:
    """What a Recipe builds: records which process built it, and a unique id."""

    builds = 0

    def __init__(self, nonce: str) -> None:
        self.nonce = nonce
        self.pid = os.getpid()
        self.id = uuid.uuid4().hex
        with _token_lock:
            Token.builds += 1


_token_lock = threading.Lock()


def make_token(nonce: str) -> Token:
    return Token(nonce)


def token_of(x: int, token: Token) -> tuple[int, int, int, str]:
    """(item, pid running the task, pid that built the token, the token's id)."""
    return x, os.getpid(), token.pid, token.id


class OpaqueHandle:
    """Stands for a C-extension handle: pickle refuses it; an adapter reopens it by name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.reopened = False

    def __reduce__(self) -> Any:
        raise TypeError("cannot pickle 'OpaqueHandle' object")


def _reopen_handle(name: str) -> OpaqueHandle:
    handle = OpaqueHandle(name)
    handle.reopened = True
    return handle


def reduce_opaque_handle(handle: OpaqueHandle) -> Recipe[OpaqueHandle]:
    return Recipe(_reopen_handle, handle.name)


def describe_handle(x: int, handle: OpaqueHandle) -> tuple[int, str, bool]:
    return x, handle.name, handle.reopened


_initialized: list[Any] = []


def set_initialized(value: Any) -> None:
    """An Executor initializer: runs once in each new worker."""
    _initialized.append(value)


def get_initialized() -> list[Any]:
    return list(_initialized)
