"""procession.testing: the backend conformance suite, for backend authors.

Example (in your test module)::

    from procession.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        backend = "mine"

This package is also a pytest plugin (``procession.testing.plugin``, loaded
through the ``pytest11`` entry point); the plugin only adds the
``--procession-backend`` option and never adds tests or fixtures by itself.
The suite is imported lazily so that loading the plugin imports neither
hypothesis nor the rest of procession.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["BackendConformance", "CoreConformance", "CrashConformance", "resolve_instance"]

if TYPE_CHECKING:
    from procession.testing.conformance import (
        BackendConformance,
        CoreConformance,
        CrashConformance,
        resolve_instance,
    )


def __getattr__(name: str) -> Any:
    if name in __all__:
        try:
            from procession.testing import conformance
        except ImportError as exc:
            raise ImportError(
                f"procession.testing needs pytest and hypothesis ({exc}): "
                f"pip install 'procession[testing]'"
            ) from exc
        return getattr(conformance, name)
    raise AttributeError(f"module 'procession.testing' has no attribute {name!r}")
