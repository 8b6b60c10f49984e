"""The pytest plugin that procession installs (entry point ``pytest11``).

pytest loads it in every project where procession is installed, so it must be
harmless there: it adds no tests and no fixtures and imports nothing heavy.
It registers one option, ``--procession-backend NAME``: every
:class:`procession.testing.BackendConformance` subclass in the run that names
its backend with ``backend = ...`` then tests NAME instead, e.g.::

    pytest tests/test_my_backend.py --procession-backend=threads

Where pytest-timeout is not installed it also declares the ``timeout`` marker
the suite uses, so ``--strict-markers`` projects can still run it.
"""

from __future__ import annotations

import pytest

__all__ = ["pytest_addoption", "pytest_configure"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("procession", "procession backend conformance suite")
    group.addoption(
        "--procession-backend",
        dest="procession_backend",
        default=None,
        metavar="NAME",
        help="run procession.testing.BackendConformance subclasses against this "
        "registered backend instead of the one each names",
    )


def pytest_configure(config: pytest.Config) -> None:
    # The suite bounds each test with pytest-timeout's marker; without that
    # plugin, declare the marker so --strict-markers projects still run it.
    if not config.pluginmanager.hasplugin("timeout"):
        config.addinivalue_line(
            "markers", "timeout(seconds): bound a test (effective with pytest-timeout)"
        )
