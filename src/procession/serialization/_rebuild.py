"""Rebuild functions whose import paths end up inside pickles.

Keep this module small and its names stable: bytes made by one process are
read by another, and both look these functions up by module and name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from procession.serialization.recipes import build_cached


def build_recipe(
    key: bytes, factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Unpickling a Recipe yields the object it builds, cached per process."""
    return build_cached(key, factory, args, kwargs)


def call(factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Build a fresh object on every unpickle (for things that must not be shared)."""
    return factory(*args, **kwargs)
