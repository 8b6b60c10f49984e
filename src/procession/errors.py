"""The exceptions procession raises.

Every class here subclasses :class:`ProcessionError`, and also the standard
exception that existing code already catches, so ``except BrokenExecutor`` or
``except pickle.PicklingError`` keep working when code moves to procession.

An exception raised by *user code* inside a worker is never wrapped: it comes
back as its own type, with the worker's traceback attached as ``__cause__``
(a :class:`RemoteTraceback`).  Only transport failures are procession's own.
"""

from __future__ import annotations

import pickle
from concurrent.futures import TimeoutError as FuturesTimeoutError
from concurrent.futures.process import BrokenProcessPool
from typing import Any

__all__ = [
    "BackendUnavailableError",
    "NestedParallelismError",
    "PipelineError",
    "ProcessionError",
    "RemoteError",
    "RemoteTraceback",
    "SerializationError",
    "TaskTimeoutError",
    "WorkerCrashedError",
    "WorkerMemoryError",
]


class ProcessionError(Exception):
    """Base class of every error procession raises on its own account."""


class SerializationError(ProcessionError, pickle.PicklingError):
    """An object could not be sent to or back from a worker.

    Raised in the caller (never as a hang or a dead worker) when a function,
    an argument or a result does not serialize.  ``path`` names the offending
    part (``args[0].inner.lock``), ``serializer`` the serializer in use, and
    ``index`` the position of the input item, when one is known.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        type_name: str | None = None,
        serializer: str | None = None,
        index: int | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.type_name = type_name
        self.serializer = serializer
        self.index = index

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_serialization_error,
            (str(self), self.path, self.type_name, self.serializer, self.index),
        )


def _rebuild_serialization_error(
    message: str,
    path: str | None,
    type_name: str | None,
    serializer: str | None,
    index: int | None,
) -> SerializationError:
    return SerializationError(
        message, path=path, type_name=type_name, serializer=serializer, index=index
    )


class WorkerCrashedError(ProcessionError, BrokenProcessPool):
    """A worker died while it ran a task (signal, ``os._exit``, segfault, lost node).

    ``exitcode`` is the process exit code (negative for a signal), ``signal_name``
    the signal's name when there was one, and ``items`` the input positions whose
    results were lost.  The pool replaces the worker and stays usable; pass
    ``retries=N`` to re-run lost items.
    """

    def __init__(
        self,
        message: str,
        *,
        exitcode: int | None = None,
        items: tuple[int, ...] = (),
    ) -> None:
        super().__init__(message)
        self.exitcode = exitcode
        self.items = items

    @classmethod
    def initializer_failed(
        cls, type_name: str, message: str, traceback_text: str
    ) -> WorkerCrashedError:
        """The one report, on every backend, of a worker initializer that raised.

        Every task of the pool then fails with it; the traceback of the
        initializer is attached as ``__cause__``.
        """
        error = cls(
            f"the worker initializer raised {type_name}: {message}; the pool runs no more "
            f"tasks (fix the initializer, then create a new pool or Executor)"
        )
        error.__cause__ = RemoteTraceback(traceback_text)
        return error

    @property
    def signal_name(self) -> str | None:
        if self.exitcode is None or self.exitcode >= 0:
            return None
        import signal

        try:
            return signal.Signals(-self.exitcode).name
        except ValueError:
            return None

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_crash_error, (str(self), self.exitcode, self.items))

    def with_context(self, message: str, *, items: tuple[int, ...]) -> WorkerCrashedError:
        """The same error (same class and details) with a new message and lost items.

        The scheduler uses it to add the input positions to a backend's error
        without turning a subclass such as :class:`WorkerMemoryError` into its base.
        """
        copy = WorkerCrashedError(message, exitcode=self.exitcode, items=items)
        copy.__cause__ = self.__cause__
        return copy


def _rebuild_crash_error(
    message: str, exitcode: int | None, items: tuple[int, ...]
) -> WorkerCrashedError:
    return WorkerCrashedError(message, exitcode=exitcode, items=items)


class WorkerMemoryError(WorkerCrashedError):
    """A worker went over its ``memory_limit=`` and was stopped and replaced.

    Raised for the task it was running (after its ``retries=``, if any).
    ``limit`` is the limit and ``size`` the resident memory reached, in bytes
    (the worker with its child processes, as last sampled by the parent).
    """

    def __init__(
        self,
        message: str,
        *,
        exitcode: int | None = None,
        items: tuple[int, ...] = (),
        limit: int | None = None,
        size: int | None = None,
    ) -> None:
        super().__init__(message, exitcode=exitcode, items=items)
        self.limit = limit
        self.size = size

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_memory_error,
            (str(self), self.exitcode, self.items, self.limit, self.size),
        )

    def with_context(self, message: str, *, items: tuple[int, ...]) -> WorkerMemoryError:
        copy = WorkerMemoryError(
            message, exitcode=self.exitcode, items=items, limit=self.limit, size=self.size
        )
        copy.__cause__ = self.__cause__
        return copy


def _rebuild_memory_error(
    message: str,
    exitcode: int | None,
    items: tuple[int, ...],
    limit: int | None,
    size: int | None,
) -> WorkerMemoryError:
    return WorkerMemoryError(message, exitcode=exitcode, items=items, limit=limit, size=size)


class TaskTimeoutError(ProcessionError, FuturesTimeoutError):
    """An item ran longer than ``timeout=`` seconds.

    On a process backend its worker was killed and replaced; the other items
    are unaffected.  ``index`` is the input position, ``timeout`` the limit.
    """

    def __init__(
        self, message: str, *, index: int | None = None, timeout: float | None = None
    ) -> None:
        super().__init__(message)
        self.index = index
        self.timeout = timeout

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_timeout_error, (str(self), self.index, self.timeout))


def _rebuild_timeout_error(
    message: str, index: int | None, timeout: float | None
) -> TaskTimeoutError:
    return TaskTimeoutError(message, index=index, timeout=timeout)


class BackendUnavailableError(ProcessionError, ImportError, LookupError):
    """A backend cannot be used here: unknown name, missing optional dependency,
    or a plug-in that fails to load.  The message says which ``pip install``
    (or which registered name) fixes it."""


class PipelineError(ProcessionError):
    """A :class:`procession.Pipeline` was built or run incorrectly (bad stage,
    run twice, used after close)."""


class RemoteError(ProcessionError):
    """A worker raised an exception that could not travel back as itself
    (it did not pickle in the worker or did not unpickle here).

    Carries the original ``type_name``, message and the remote traceback text.
    """

    def __init__(self, type_name: str, message: str, traceback_text: str) -> None:
        super().__init__(
            f"{type_name}: {message} (the exception itself could not be sent back "
            f"from the worker; its type, message and traceback are kept here)"
        )
        self.type_name = type_name
        self.remote_message = message
        self.traceback_text = traceback_text

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteError, (self.type_name, self.remote_message, self.traceback_text))


class RemoteTraceback(Exception):
    """Holds a worker's formatted traceback; attached as ``__cause__``."""

    def __init__(self, traceback_text: str) -> None:
        super().__init__(traceback_text)
        self.traceback_text = traceback_text

    def __str__(self) -> str:
        return f'\n"""\n{self.traceback_text}"""'


class NestedParallelismError(ProcessionError, RuntimeError):
    """A task asked for a new process pool for nested work, which procession refuses.

    Raised by ``procession.map``, ``Executor`` and ``Pipeline`` when they are
    called inside a task with an explicit process backend (see
    :mod:`procession._nesting` for the rule: a nested map with no ``backend=``
    runs inline in the worker).
    """
