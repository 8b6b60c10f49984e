"""Explain serialization failures: which part of an object failed, and the fix."""

from __future__ import annotations

from typing import Any

from procession.errors import SerializationError
from procession.serialization.serializers import Serializer, get_serializer


def diagnose(
    obj: Any,
    serializer: Serializer,
    *,
    root: str,
    exc: BaseException,
    index: int | None = None,
) -> SerializationError:
    """Build the SerializationError for ``obj`` failing under ``serializer``."""
    where = f" (input item {index})" if index is not None else ""
    return SerializationError(
        f"cannot send {root}{where} ({type(obj).__qualname__}) with serializer "
        f"{serializer.name!r}: {type(exc).__name__}: {exc}",
        path=root,
        type_name=type(obj).__qualname__,
        serializer=serializer.name,
        index=index,
    )


def check_picklable(obj: Any, serializer: str | Serializer | None = None) -> None:
    """Raise SerializationError naming the offending part if ``obj`` does not serialize.

    Example::

        procession.check_picklable({"conn": threading.Lock()}, "pickle")
    """
    chosen = get_serializer(serializer, default="cloudpickle")
    try:
        chosen.loads(chosen.dumps(obj))
    except Exception as exc:
        raise diagnose(obj, chosen, root="obj", exc=exc) from exc
