"""Backend lists for the serialization tests.

These tests send functions and classes defined in the test modules, which a
worker finds by importing the module (``pickle`` always works that way).
Workers of a *remote* backend (Ray, Dask on a cluster) cannot import the test
modules, and starting them costs many seconds; the shared conformance suite
(``procession.testing``, with importable tasks) covers adapters and Recipes on
those backends.  Here: every usable local backend.
"""

from __future__ import annotations

import procession

_INFOS = procession.available_backends()

LOCAL_BACKENDS = sorted(
    name
    for name, info in _INFOS.items()
    if info.usable and info.capabilities is not None and not info.capabilities.remote
)
LOCAL_PROCESS_BACKENDS = sorted(
    name for name in LOCAL_BACKENDS if (caps := _INFOS[name].capabilities) and caps.isolated
)
