"""The worker runtime: what every backend runs on the far side.

A backend moves two kinds of opaque bytes and calls two functions here:

    initialize_worker(setup)  once per worker, before its first task
    run_task(task) -> result  for every task

The envelopes are defined in :mod:`procession.protocol`.  Keep the names in
this module stable: backends reference them by import path.

A decoded function is reused only within the run (one ``map`` or ``submit``)
that sent it, so each map runs the function as it is in the parent at that
call; a function that captures a value with state is rebuilt for every call.
"""

from __future__ import annotations

import functools
import os
import pickle
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from procession import protocol
from procession.serialization import shm
from procession.serialization.serializers import Serializer, get_serializer

__all__ = ["in_worker", "initialize_worker", "run_task"]

VERSION = protocol.VERSION
_FUNCTION_CACHE_SIZE = 64

# Decoding a closure for every chunk would cost more than the chunk itself for
# tiny tasks, so each process keeps the last few decoded functions by run.
_functions: OrderedDict[tuple[bytes, bytes], Callable[..., Any]] = OrderedDict()
_functions_lock = threading.Lock()

Failure = protocol.Failure

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


def _load_function(
    serializer: Serializer, task: protocol.Task, buffers: Mapping[str, Any] | None
) -> Any:
    key = (task.run_id, task.fn_digest)
    with _functions_lock:
        fn = _functions.get(key)
        if fn is not None:
            _functions.move_to_end(key)
            return fn
    if shm.arena.has_buffers(task.fn_bytes):
        # Not cached: it maps shared memory that the parent frees when the map ends.
        return _loads_shared(serializer, task.fn_bytes, buffers)
    fn = serializer.loads(task.fn_bytes)
    with _functions_lock:
        _functions[key] = fn
        if len(_functions) > _FUNCTION_CACHE_SIZE:
            _functions.popitem(last=False)
    return fn


class _FreshEachCall:
    """Rebuilds the function from its bytes for every call: it captures a value
    with state (a generator, a file position) that one call must not use up."""

    def __init__(
        self, serializer: Serializer, data: bytes, buffers: Mapping[str, Any] | None
    ) -> None:
        self._loads = functools.partial(_loads_shared, serializer)
        self._data = data
        self._buffers = buffers

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._loads(self._data, self._buffers)(*args, **kwargs)


def _loads_shared(serializer: Serializer, data: bytes, buffers: Mapping[str, Any] | None) -> Any:
    """Load ``data``; its large buffers (if any) map the parent's shared memory,
    or are copied from the stored ``buffers`` the backend delivered."""
    return shm.load_payload(serializer, data, private=True, attachments=buffers)[0]


def _interrupt_is_real(exc: BaseException) -> bool:
    """Whether ``exc`` may be a real Ctrl-C rather than a KeyboardInterrupt the task raised.

    Worker processes ignore SIGINT and worker threads never receive signals, so
    there it can only come from task code.  Only a task run in the caller's
    main thread (the serial backend) can be hit by the user's Ctrl-C, whose
    KeyboardInterrupt carries no message.
    """
    return (
        isinstance(exc, KeyboardInterrupt)
        and not exc.args
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )


def run_task(task: bytes, buffers: Mapping[str, Any] | None = None) -> bytes:
    """Run one task (a function and a chunk of items) and return the result bytes.

    Never raises for anything the user's code or data does: failures are
    encoded in the result so the worker survives and the caller gets them.
    ``buffers``: on a backend with ``Capabilities.buffer_store``, the stored
    buffers the task names, by key (``StoredBuffer.key`` -> its bytes).
    """
    started = time.perf_counter()
    decoded = protocol.decode_task(task)
    serializer = get_serializer(decoded.serializer)
    failures: list[Failure] = []
    try:
        if decoded.fresh_fn:
            fn: Callable[..., Any] = _FreshEachCall(serializer, decoded.fn_bytes, buffers)
        else:
            fn = _load_function(serializer, decoded, buffers)
        # Large arguments arrive as copy-on-write maps of the parent's shared memory;
        # ``reply`` sends large results back the same way (or in-band).
        items, reply = shm.load_payload(
            serializer, decoded.items_bytes, private=True, attachments=buffers
        )
    except BaseException as exc:
        if _interrupt_is_real(exc):
            raise
        return protocol.encode_load_failure(exc, serializer, time.perf_counter() - started)

    values: list[Any] = []
    _task_context.depth = getattr(_task_context, "depth", 0) + 1
    try:
        _run_items(fn, items, decoded.star, decoded.stop_on_error, serializer, values, failures)
    finally:
        _task_context.depth -= 1
    del items, fn
    seconds = time.perf_counter() - started
    try:
        values_bytes = reply.dumps(serializer, values)
    except BaseException as exc:
        if _interrupt_is_real(exc):
            raise
        values_bytes, failures = _salvage_results(values, failures, serializer)
    return protocol.encode_result(values_bytes, failures, seconds)


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
        except BaseException as exc:
            # SystemExit and the task's own KeyboardInterrupt included: the task
            # failed, the worker did not.
            if _interrupt_is_real(exc):
                raise
            position = len(values)
            failures.append((position, *protocol.encode_exception(exc, serializer)))
            append(None)
            if stop_on_error:
                break
        position = len(values)


def _salvage_results(
    values: list[Any], failures: list[Failure], serializer: Serializer
) -> tuple[bytes, list[Failure]]:
    """Some result did not serialize: replace each bad one with its failure.

    An ordinary exception becomes a SerializationError naming the result; a
    SystemExit (or other BaseException) raised while pickling travels back as
    itself, as ``ProcessPoolExecutor`` does.
    """
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
            error: BaseException = diagnose(value, serializer, root="result", exc=exc)
            failures.append((position, *protocol.encode_exception(error, serializer)))
            kept.append(None)
        except BaseException as exc:
            failures.append((position, *protocol.encode_exception(exc, serializer)))
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


def initializer_failure(setup: bytes | None) -> BaseException | None:
    """Run the initializer for an in-process backend; the error every task must fail with.

    Returns None when it succeeded, else the ``WorkerCrashedError`` that every
    process backend reports for a failing initializer (its traceback as
    ``__cause__``), so in-process backends report it the same way.

    Example::

        self._init_error = procession.worker.initializer_failure(self.worker_setup)
        ...
        if self._init_error is not None:
            future.settle(exc=self._init_error)
    """
    import traceback

    from procession.errors import WorkerCrashedError

    try:
        initialize_worker(setup)
    except BaseException as exc:
        return WorkerCrashedError.initializer_failed(
            f"{type(exc).__module__}.{type(exc).__qualname__}",
            str(exc),
            "".join(traceback.format_exception(exc)),
        )
    return None


def worker_label() -> str:
    return f"pid {os.getpid()}"
