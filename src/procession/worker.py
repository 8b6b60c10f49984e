"""The worker runtime: what every backend runs on the far side.

A backend moves two kinds of opaque bytes and calls two functions here:

    initialize_worker(setup)  once per worker, before its first task
    run_task(task) -> result  for every task

Both the task and the result are small envelopes (stdlib pickle of bytes,
strings and ints) around payloads made by the serializer the caller chose, so
a backend never needs to know which serializer is in use.  Keep the names in
this module stable: backends reference them by import path.

    task   = (VERSION, serializer, fn_digest, fn_bytes, items_bytes, star, stop_on_error)
    result = (VERSION, values_bytes | None, failures, seconds)
    failures: [(position, exc_bytes | None, type_name, message, traceback_text)]
"""

from __future__ import annotations

import hashlib
import os
import pickle
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from procession.serialization import shm
from procession.serialization.serializers import Serializer, get_serializer

__all__ = ["in_worker", "initialize_worker", "run_task"]

VERSION = 1
_FUNCTION_CACHE_SIZE = 64

# Decoding a closure for every chunk would cost more than the chunk itself for
# tiny tasks, so each process keeps the last few decoded functions by digest.
_functions: OrderedDict[bytes, Callable[..., Any]] = OrderedDict()
_functions_lock = threading.Lock()

Failure = tuple[int, bytes | None, str, str, str]

# Set while this thread runs a task's user code (any backend, threads included).
_task_context = threading.local()


def in_worker() -> bool:
    """True while the calling thread runs a procession task (on any backend).

    Nested parallelism uses it: a ``procession.map`` called from inside a task
    must not start another pool of its own by default.

    Example::

        procession.map(lambda _: procession.worker.in_worker(), [0])  # yields True
    """
    return getattr(_task_context, "depth", 0) > 0


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _load_function(serializer: Serializer, fn_digest: bytes, fn_bytes: bytes) -> Any:
    if shm.arena.has_buffers(fn_bytes):
        # Not cached: it maps shared memory that the parent frees when the map ends.
        return shm.load_payload(serializer, fn_bytes, private=True)[0]
    with _functions_lock:
        fn = _functions.get(fn_digest)
        if fn is not None:
            _functions.move_to_end(fn_digest)
            return fn
    fn = serializer.loads(fn_bytes)
    with _functions_lock:
        _functions[fn_digest] = fn
        if len(_functions) > _FUNCTION_CACHE_SIZE:
            _functions.popitem(last=False)
    return fn


def encode_exception(
    exc: BaseException, serializer: Serializer
) -> tuple[bytes | None, str, str, str]:
    """Pack an exception so it can travel back even if it does not pickle."""
    tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        message = str(exc)
    except Exception:
        message = f"<str() of {type_name} failed>"
    try:
        exc_bytes: bytes | None = serializer.dumps(exc)
    except Exception:
        exc_bytes = None
    return exc_bytes, type_name, message, tb_text


def run_task(task: bytes) -> bytes:
    """Run one task (a function and a chunk of items) and return the result bytes.

    Never raises for anything the user's code or data does: failures are
    encoded in the result so the worker survives and the caller gets them.
    """
    started = time.perf_counter()
    version, serializer_name, fn_digest, fn_bytes, items_bytes, star, stop_on_error = pickle.loads(
        task
    )
    if version != VERSION:
        raise RuntimeError(f"task envelope version {version}, worker speaks {VERSION}")
    serializer = get_serializer(serializer_name)
    failures: list[Failure] = []
    try:
        fn = _load_function(serializer, fn_digest, fn_bytes)
        # Large arguments arrive as copy-on-write maps of the parent's shared memory;
        # ``reply`` sends large results back the same way (or in-band).
        items, reply = shm.load_payload(serializer, items_bytes, private=True)
    except BaseException as exc:
        failures.append((-1, *encode_exception(exc, serializer)))
        return pickle.dumps((VERSION, None, failures, time.perf_counter() - started), 5)

    values: list[Any] = []
    _task_context.depth = getattr(_task_context, "depth", 0) + 1
    try:
        _run_items(fn, items, star, stop_on_error, serializer, values, failures)
    finally:
        _task_context.depth -= 1
    seconds = time.perf_counter() - started
    try:
        values_bytes = reply.dumps(serializer, values)
    except Exception:
        values_bytes, failures = _salvage_results(values, failures, serializer)
    return pickle.dumps((VERSION, values_bytes, failures, seconds), 5)


def _run_items(
    fn: Callable[..., Any],
    items: list[Any],
    star: bool,
    stop_on_error: bool,
    serializer: Serializer,
    values: list[Any],
    failures: list[Failure],
) -> None:
    append = values.append
    position = 0
    count = len(items)
    while position < count:
        try:
            if star:
                for args, kwargs in items[position:] if position else items:
                    append(fn(*args, **kwargs))
            else:
                for item in items[position:] if position else items:
                    append(fn(item))
        except (KeyboardInterrupt, GeneratorExit):
            raise
        except BaseException as exc:
            # SystemExit included: a task that calls sys.exit() failed, the worker did not.
            position = len(values)
            failures.append((position, *encode_exception(exc, serializer)))
            append(None)
            if stop_on_error:
                break
        position = len(values)


def _salvage_results(
    values: list[Any], failures: list[Failure], serializer: Serializer
) -> tuple[bytes, list[Failure]]:
    """Some result did not serialize: replace each bad one with a SerializationError."""
    from procession.serialization.diagnostics import diagnose

    failed_positions = {f[0] for f in failures}
    kept: list[Any] = []
    for position, value in enumerate(values):
        if position in failed_positions:
            kept.append(None)
            continue
        try:
            serializer.dumps(value)
        except Exception as exc:
            error = diagnose(value, serializer, root="result", exc=exc)
            failures.append((position, *encode_exception(error, serializer)))
            kept.append(None)
        else:
            kept.append(value)
    failures.sort(key=lambda f: f[0])
    return serializer.dumps(kept), failures


def encode_setup(
    serializer: Serializer, initializer: Callable[..., Any] | None, initargs: tuple[Any, ...]
) -> bytes | None:
    """Pack an initializer for :func:`initialize_worker` (None when there is none)."""
    if initializer is None:
        return None
    return pickle.dumps((VERSION, serializer.name, serializer.dumps((initializer, initargs))), 5)


def initialize_worker(setup: bytes | None) -> None:
    """Run the user's initializer in a fresh worker (exceptions propagate)."""
    if setup is None:
        return
    _version, serializer_name, payload = pickle.loads(setup)
    initializer, initargs = get_serializer(serializer_name).loads(payload)
    initializer(*initargs)


def worker_label() -> str:
    return f"pid {os.getpid()}"
