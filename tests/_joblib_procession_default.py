"""pytest plug-in: make procession joblib's default backend (for joblib's own test suite).

Used by ``tests/test_joblib_suite.py``, which runs
``pytest -p _joblib_procession_default --pyargs joblib.test.test_parallel``.
"""

from __future__ import annotations

import pytest

import procession.joblib


def pytest_configure(config: pytest.Config) -> None:
    procession.joblib.register("procession", make_default=True)
