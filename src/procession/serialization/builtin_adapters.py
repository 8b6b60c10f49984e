"""Adapters for standard-library objects that pickle refuses."""

from __future__ import annotations


def register_builtin_adapters() -> None:
    """Register the standard library's adapters (called once, on first lookup)."""
