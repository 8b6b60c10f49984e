"""Serialization and adapters: what crosses the process boundary, and how.

See :mod:`procession.serialization.serializers` for scope and non-goals.
"""

from __future__ import annotations

from procession.serialization.adapters import register_adapter, registered_adapters
from procession.serialization.diagnostics import check_picklable, diagnose
from procession.serialization.recipes import Recipe
from procession.serialization.serializers import (
    Serializer,
    get_serializer,
    register_serializer,
    serializer_names,
)

__all__ = [
    "Recipe",
    "Serializer",
    "check_picklable",
    "diagnose",
    "get_serializer",
    "register_adapter",
    "register_serializer",
    "registered_adapters",
    "serializer_names",
]
