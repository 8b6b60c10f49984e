"""Helpers for tests parametrised over backends."""

from __future__ import annotations

from procession.backends.registry import get_backend_class


def workers_up_to(backend_name: str, count: int) -> int:
    """``count`` workers, or fewer where the backend cannot run that many (serial)."""
    limit = getattr(get_backend_class(backend_name), "max_workers", None)
    return count if limit is None else min(count, limit)
