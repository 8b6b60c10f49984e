"""The wire protocol: how a task and its result are packed, in one place.

The parent encodes a task here, the worker runtime (:mod:`procession.worker`)
decodes it here, runs it, and encodes the result here; the parent decodes the
result here.  Backends only move the bytes.  Both envelopes are stdlib pickles
of bytes, strings, ints and bools around payloads made by the serializer the
caller chose, so a backend never needs to know which serializer is in use::

    task   = (VERSION, serializer, run_id, fn_digest, fn_bytes, fresh_fn,
              items_bytes, star, stop_on_error)
    result = (VERSION, values_bytes | None, failures, seconds)
    failures: [(position, exc_bytes | None, type_name, message, traceback_text)]

``values_bytes is None`` means the worker could not load the task at all
(position -1 in ``failures``).  ``run_id`` names one ``map`` (or one
``submit``): a worker may reuse a decoded function only within the run that
sent it, so a function and the state it captures always arrive as they are in
the parent at that call.  ``fresh_fn`` says the function captures a *value
with state* (a generator, a file position): the worker rebuilds it for every
call.

Every decode failure takes one path: :func:`decode_result` turns it into an
exception for the affected items (never a pending future, never a dead pool).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from procession.errors import RemoteError, RemoteTraceback, SerializationError
from procession.serialization import shm
from procession.serialization.serializers import Serializer

__all__ = [
    "VERSION",
    "DecodedResult",
    "EncodedFunction",
    "Task",
    "decode_failure",
    "decode_result",
    "decode_task",
    "encode_exception",
    "encode_function",
    "encode_load_failure",
    "encode_result",
    "encode_task",
    "new_run_id",
]

VERSION = 2

Failure = tuple[int, bytes | None, str, str, str]


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def new_run_id() -> bytes:
    """A fresh name for one map or one submit (functions are cached per run)."""
    return os.urandom(12)


# -- the function ---------------------------------------------------------------


@dataclass(frozen=True)
class EncodedFunction:
    """A function serialized once per call of ``map``/``submit``."""

    digest: bytes
    data: bytes = field(repr=False)
    #: It captures a value with state: rebuild it for every call in the worker.
    fresh: bool = False


def encode_function(
    fn: Callable[..., Any],
    serializer: Serializer,
    *,
    role: str = "map",
    arena: shm.InBand = shm.IN_BAND,
) -> EncodedFunction:
    """Serialize ``fn``; raise TypeError if it is not callable, SerializationError if it
    does not serialize (naming it).  ``arena``: where its large buffers go (written
    once per call, kept until the arena closes)."""
    if not callable(fn):
        raise TypeError(f"the function to {role} must be callable, got {type(fn).__name__}")
    from procession.serialization import adapters
    from procession.serialization.diagnostics import diagnose

    try:
        with adapters.track_stateful_values() as seen:
            data = arena.dumps(serializer, fn, pin=True)
        fresh = seen.count > 0
    except Exception as exc:
        raise diagnose(fn, serializer, root="fn", exc=exc) from exc
    return EncodedFunction(digest(data), data, fresh)


# -- the task -------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A decoded task envelope (the payloads are still serializer bytes)."""

    serializer: str
    run_id: bytes
    fn_digest: bytes
    fn_bytes: bytes = field(repr=False)
    fresh_fn: bool
    items_bytes: bytes = field(repr=False)
    star: bool
    stop_on_error: bool


def encode_task(
    serializer: Serializer,
    run_id: bytes,
    fn: EncodedFunction,
    items_bytes: bytes,
    *,
    star: bool,
    stop_on_error: bool,
) -> bytes:
    return pickle.dumps(
        (
            VERSION,
            serializer.name,
            run_id,
            fn.digest,
            fn.data,
            fn.fresh,
            items_bytes,
            star,
            stop_on_error,
        ),
        5,
    )


def decode_task(data: bytes) -> Task:
    envelope = pickle.loads(data)
    if envelope[0] != VERSION:
        raise RuntimeError(
            f"task envelope version {envelope[0]}, this worker speaks {VERSION}: the parent "
            f"and the worker run different procession versions; install the same one on both"
        )
    return Task(*envelope[1:])


# -- the result -----------------------------------------------------------------


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
    except BaseException:  # SystemExit from a __reduce__ included: send the text instead
        exc_bytes = None
    return exc_bytes, type_name, message, tb_text


def encode_result(values_bytes: bytes, failures: list[Failure], seconds: float) -> bytes:
    return pickle.dumps((VERSION, values_bytes, failures, seconds), 5)


def encode_load_failure(exc: BaseException, serializer: Serializer, seconds: float) -> bytes:
    """The worker could not load the task: one failure at position -1."""
    return pickle.dumps((VERSION, None, [(-1, *encode_exception(exc, serializer))], seconds), 5)


def decode_failure(
    serializer: Serializer,
    exc_bytes: bytes | None,
    type_name: str,
    message: str,
    traceback_text: str,
) -> BaseException:
    """Rebuild a worker's exception, with its traceback text as ``__cause__``."""
    exc: BaseException | None = None
    if exc_bytes is not None:
        try:
            loaded = serializer.loads(exc_bytes)
        except (Exception, SystemExit):
            loaded = None
        if isinstance(loaded, BaseException):
            exc = loaded
    if exc is None:
        exc = RemoteError(type_name, message, traceback_text)
    exc.__cause__ = RemoteTraceback(traceback_text)
    return exc


@dataclass
class DecodedResult:
    """What came back for one task.

    ``values`` has one entry per item (None where the item failed); ``errors``
    maps positions within the task to exceptions.  When the whole task failed
    before or after running (the worker could not load it, or its results could
    not be rebuilt here), ``task_error`` is set and ``values`` is empty.
    """

    values: list[Any]
    errors: dict[int, BaseException]
    seconds: float
    task_error: BaseException | None = None


def decode_result(
    data: bytes,
    serializer: Serializer,
    *,
    what: str = "the task",
    arena: shm.InBand = shm.IN_BAND,
) -> DecodedResult:
    """Decode a result envelope; every failure to do so becomes ``task_error``.
    ``arena``: the map's, so large result buffers become arrays over shared memory."""
    try:
        version, values_bytes, failures, seconds = pickle.loads(data)
    except (Exception, SystemExit) as exc:
        return DecodedResult([], {}, 0.0, _broken_envelope(exc, what))
    if version != VERSION:
        error: BaseException = RuntimeError(
            f"result envelope version {version}, this process speaks {VERSION}: the parent "
            f"and the worker run different procession versions"
        )
        return DecodedResult([], {}, seconds, error)
    if values_bytes is None:
        _, exc_bytes, type_name, message, tb_text = failures[0]
        load_error = decode_failure(serializer, exc_bytes, type_name, message, tb_text)
        return DecodedResult([], {}, seconds, _worker_load_error(load_error, serializer))
    try:
        values = arena.loads(serializer, values_bytes)
    except (Exception, SystemExit) as exc:
        error = SerializationError(
            f"the results of {what} could not be rebuilt in the parent with serializer "
            f"{serializer.name!r}: {type(exc).__name__}: {exc}. An object's unpickling "
            f"(its __reduce__/__setstate__) failed here; make the result picklable both "
            f"ways, or return plain data",
            serializer=serializer.name,
            path="result",
        )
        error.__cause__ = exc
        return DecodedResult([], {}, seconds, error)
    errors = {
        position: decode_failure(serializer, exc_bytes, type_name, message, tb_text)
        for position, exc_bytes, type_name, message, tb_text in failures
    }
    return DecodedResult(values, errors, seconds)


def _broken_envelope(exc: BaseException, what: str) -> BaseException:
    error = SerializationError(
        f"the result envelope of {what} could not be read ({type(exc).__name__}: {exc}); "
        f"the backend delivered damaged bytes"
    )
    error.__cause__ = exc
    return error


def _worker_load_error(exc: BaseException, serializer: Serializer) -> BaseException:
    """The worker could not decode the task: a serialization problem, reported here."""
    cause = exc.__cause__
    hint = (
        " (a function pickled by reference must be importable in the worker: define it in a "
        "module, or use serializer='cloudpickle')"
        if not serializer.sends_code_by_value
        else ""
    )
    error = SerializationError(
        f"the worker could not load the task sent with serializer {serializer.name!r}: "
        f"{type(exc).__name__}: {exc}{hint}",
        serializer=serializer.name,
    )
    error.__cause__ = cause
    return error
