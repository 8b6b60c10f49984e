"""The map options, validated once for every entry point.

``procession.map``, ``Executor.map``, Pipeline stages and ``amap`` all build a
:class:`MapOptions`; so the same bad value raises the same exception, with the
same message, wherever it is given.  Validation has two steps: the values
alone (:class:`MapOptions` refuses a bad one when it is made: ``TypeError``
for a wrong type, ``ValueError`` for a value out of range), then against the
backend that will run them (:meth:`MapOptions.check_backend`: an option the
backend cannot honour is refused, never silently ignored).

Example::

    options = MapOptions(chunksize=10, retries=2)
    options.check_backend(procession.create_backend("threads"))
    # ValueError: backend 'threads' cannot detect a crashed worker ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from procession.backends.base import Backend

__all__ = ["ON_ERROR_CHOICES", "MapOptions", "OnError", "check_workers"]

OnError = Literal["raise", "return"]
ON_ERROR_CHOICES = ("raise", "return")


def check_workers(workers: Any, *, name: str = "workers") -> int | None:
    """``workers`` as given, or None; TypeError/ValueError naming ``name`` otherwise.

    Example::

        check_workers(0, name="max_workers")  # ValueError: max_workers must be greater than 0
    """
    if workers is None:
        return None
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise TypeError(f"{name} must be a positive int or None, got {workers!r}")
    if workers <= 0:
        raise ValueError(f"{name} must be greater than 0, got {workers}")
    return workers


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class MapOptions:
    """The options of one map, checked on creation.

    ``chunksize``: "auto" or a positive int; ``ordered``: bool; ``timeout``:
    seconds per item (> 0) or None; ``retries``: int >= 0; ``on_error``:
    "raise" or "return"; ``progress``: bool.
    """

    chunksize: int | str = "auto"
    ordered: bool = True
    timeout: float | None = None
    retries: int = 0
    on_error: OnError = "raise"
    progress: bool = False

    def __post_init__(self) -> None:
        chunksize = self.chunksize
        if chunksize != "auto":
            if not _is_int(chunksize):
                raise TypeError(f"chunksize must be 'auto' or a positive int, got {chunksize!r}")
            assert isinstance(chunksize, int)
            if chunksize <= 0:
                raise ValueError(f"chunksize must be 'auto' or a positive int, got {chunksize}")
        if not isinstance(self.ordered, bool):
            raise TypeError(f"ordered must be True or False, got {self.ordered!r}")
        if not isinstance(self.progress, bool):
            raise TypeError(f"progress must be True or False, got {self.progress!r}")
        if not isinstance(self.on_error, str):
            raise TypeError(f"on_error must be 'raise' or 'return', got {self.on_error!r}")
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be 'raise' or 'return', got {self.on_error!r}")
        if not _is_int(self.retries):
            raise TypeError(f"retries must be an int >= 0, got {self.retries!r}")
        if self.retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {self.retries}")
        timeout = self.timeout
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, int | float):
                raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
            if not timeout > 0:
                raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
            if chunksize not in ("auto", 1):
                raise ValueError(
                    f"timeout= is per item, so items are sent one at a time; "
                    f"use chunksize='auto' or 1 with it, not {chunksize}"
                )

    @property
    def fixed_chunksize(self) -> int | None:
        """The chunk size to use, or None to let the scheduler choose."""
        if self.timeout is not None:
            return 1
        return None if self.chunksize == "auto" else int(self.chunksize)

    def check_backend(self, backend: Backend) -> None:
        """Refuse what ``backend`` cannot honour (step two of validation)."""
        capabilities = backend.capabilities
        if self.timeout is not None and not capabilities.kill:
            raise ValueError(
                f"backend {backend.name!r} cannot stop a running task, so it cannot honour "
                f"timeout={self.timeout}; use a process backend (backend='process') or drop "
                f"timeout="
            )
        if self.retries and not capabilities.crash_detection:
            raise ValueError(
                f"backend {backend.name!r} cannot detect a crashed worker, so retries="
                f"{self.retries} would never re-run anything; use a process backend "
                f"(backend='process') or drop retries="
            )
