"""procession: one parallel map / pipeline API over pluggable backends.

Example::

    import procession
    squares = list(procession.map(lambda x: x * x, range(10)))

This module only re-exports the public names; everything loads on first use,
so ``import procession`` stays fast and imports no loky, dask or cloudpickle.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "map": "procession.api",
    "amap": "procession.aio",
    "Executor": "procession.api",
    "Pool": "procession.pool",
    "Pipeline": "procession.pipeline",
    "Backend": "procession.backends.base",
    "Capabilities": "procession.backends.base",
    "TaskFuture": "procession.backends.base",
    "StoredBuffer": "procession.backends.base",
    "BackendInfo": "procession.backends.registry",
    "available_backends": "procession.backends.registry",
    "create_backend": "procession.backends.registry",
    "register_backend": "procession.backends.registry",
    "Recipe": "procession.serialization.recipes",
    "Serializer": "procession.serialization.serializers",
    "register_serializer": "procession.serialization.serializers",
    "register_adapter": "procession.serialization.adapters",
    "unregister_adapter": "procession.serialization.adapters",
    "check_picklable": "procession.serialization.diagnostics",
    "ProcessionError": "procession.errors",
    "SerializationError": "procession.errors",
    "WorkerCrashedError": "procession.errors",
    "WorkerMemoryError": "procession.errors",
    "TaskTimeoutError": "procession.errors",
    "BackendUnavailableError": "procession.errors",
    "PipelineError": "procession.errors",
    "NestedParallelismError": "procession.errors",
    "RemoteError": "procession.errors",
}

# Submodules reachable as attributes without their own import statement.
_SUBMODULES = frozenset({"joblib"})

__all__ = [
    "Backend",
    "BackendInfo",
    "BackendUnavailableError",
    "Capabilities",
    "Executor",
    "NestedParallelismError",
    "Pipeline",
    "PipelineError",
    "Pool",
    "ProcessionError",
    "Recipe",
    "RemoteError",
    "SerializationError",
    "Serializer",
    "StoredBuffer",
    "TaskFuture",
    "TaskTimeoutError",
    "WorkerCrashedError",
    "WorkerMemoryError",
    "__version__",
    "amap",
    "available_backends",
    "check_picklable",
    "create_backend",
    "map",
    "register_adapter",
    "register_backend",
    "register_serializer",
    "serializers",
    "unregister_adapter",
]

if TYPE_CHECKING:
    from procession.aio import amap
    from procession.api import Executor, map
    from procession.backends.base import Backend, Capabilities, StoredBuffer, TaskFuture
    from procession.backends.registry import (
        BackendInfo,
        available_backends,
        create_backend,
        register_backend,
    )
    from procession.errors import (
        BackendUnavailableError,
        NestedParallelismError,
        PipelineError,
        ProcessionError,
        RemoteError,
        SerializationError,
        TaskTimeoutError,
        WorkerCrashedError,
        WorkerMemoryError,
    )
    from procession.pipeline import Pipeline
    from procession.pool import Pool
    from procession.serialization.adapters import register_adapter, unregister_adapter
    from procession.serialization.diagnostics import check_picklable
    from procession.serialization.recipes import Recipe
    from procession.serialization.serializers import Serializer, register_serializer

    serializers: tuple[str, ...]


def __getattr__(name: str) -> Any:
    if name == "serializers":
        # The names accepted by serializer=, read live so registrations show.
        from procession.serialization.serializers import serializer_names

        return serializer_names()
    if name in _SUBMODULES:
        # ``procession.joblib`` after a plain ``import procession`` (it imports joblib).
        return importlib.import_module(f"procession.{name}")
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'procession' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
