"""Serialization and adapters: what crosses the process boundary, and how.

See :mod:`procession.serialization.serializers` for scope and non-goals,
``docs/serialization.md`` and ``docs/adapters.md`` for the guide.
"""

from __future__ import annotations

from procession.serialization.adapters import (
    register_adapter,
    registered_adapters,
    track_stateful_values,
    unregister_adapter,
)
from procession.serialization.diagnostics import check_picklable, check_report, diagnose
from procession.serialization.policy import Policy, current_policy, policy, snapshot
from procession.serialization.recipes import Recipe, build_count, built_recipes_clear
from procession.serialization.serializers import (
    Serializer,
    get_serializer,
    register_serializer,
    serializer_names,
)

__all__ = [
    "Policy",
    "Recipe",
    "Serializer",
    "build_count",
    "built_recipes_clear",
    "check_picklable",
    "check_report",
    "current_policy",
    "diagnose",
    "get_serializer",
    "policy",
    "register_adapter",
    "register_serializer",
    "registered_adapters",
    "serializer_names",
    "snapshot",
    "track_stateful_values",
    "unregister_adapter",
]
