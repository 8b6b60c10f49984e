"""procession's own backends through the shipped conformance suite (procession.testing).

Each backend runs the core half; the crash half runs on the backends that
declare isolated workers with crash detection.  Backends are given by name,
so the suite uses the warm shared pools that the leak check knows about.
"""

from __future__ import annotations

import pytest

import procession
from procession.testing import CoreConformance, CrashConformance

# procession's own backends; plug-ins run the suite in their own tests.
BUILTIN = sorted(
    name
    for name, info in procession.available_backends().items()
    if info.usable and info.origin == "built-in"
)
CRASH_DETECTING = sorted(
    name
    for name, info in procession.available_backends().items()
    if name in BUILTIN
    and info.capabilities is not None
    and info.capabilities.isolated
    and info.capabilities.crash_detection
)


class TestCoreConformance(CoreConformance):
    @pytest.fixture(params=BUILTIN)
    def conformance_backend(self, request: pytest.FixtureRequest) -> str:
        return str(request.param)


@pytest.mark.skipif(not CRASH_DETECTING, reason="no backend with crash detection is installed")
class TestCrashConformance(CrashConformance):
    @pytest.fixture(params=CRASH_DETECTING)
    def conformance_backend(self, request: pytest.FixtureRequest) -> str:
        return str(request.param)
