"""procession's own backends through the shipped conformance suite (procession.testing).

Each backend runs the core half; the crash half runs on the backends that
declare isolated workers with crash detection.  Backends are given by name,
so the suite uses the warm shared pools that the leak check knows about.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import procession
from procession import Backend
from procession.testing import BackendConformance, CoreConformance, CrashConformance

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


class TestInstanceConformance(BackendConformance):
    """The suite given a Backend instance, as a backend that needs options is given."""

    @pytest.fixture
    def conformance_backend(self) -> Iterator[Backend]:
        backend = procession.create_backend("process", workers=2)
        backend.start()
        yield backend
        backend.shutdown(wait=False, kill=True)


# -- the guide's minimal backend, run as a third-party project would ---------------

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "writing-a-backend.md"


def _guide_files() -> dict[str, str]:
    """The code blocks marked ``<!-- test-file: NAME -->`` in the backend guide."""
    found = dict(
        re.findall(r"<!-- test-file: (\S+) -->\s*```python\n(.*?)```", GUIDE.read_text(), re.S)
    )
    assert set(found) == {"my_backend.py", "test_pool_backend.py"}, sorted(found)
    return found


@pytest.mark.timeout(150)
def test_guide_backend_passes_the_suite_and_a_faulty_one_fails(tmp_path: Path) -> None:
    files = _guide_files()
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    # The same backend, but forgetting to run the user's initializer in its workers:
    # the suite must catch it.
    faulty = files["my_backend.py"].replace('name = "pool"', 'name = "forgetful"')
    for line in ("initializer=worker.initialize_worker,", "initargs=(self.worker_setup,),"):
        assert line in faulty
        faulty = faulty.replace(line, "")
    (tmp_path / "forgetful_backend.py").write_text(faulty)
    (tmp_path / "test_forgetful.py").write_text(
        "import procession\n"
        "from procession.testing import BackendConformance\n"
        "from forgetful_backend import PoolBackend\n"
        'procession.register_backend("forgetful", PoolBackend)\n'
        "class TestForgetful(BackendConformance):\n"
        '    backend = "forgetful"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "HYPOTHESIS"))}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=140,
        env=env,
        check=False,
    )
    output = run.stdout + run.stderr
    failed = sorted(re.findall(r"^FAILED (\S+)", run.stdout, re.M))
    assert failed == [
        "test_forgetful.py::TestForgetful::test_executor_initializer_runs_in_each_worker"
    ], output[-4000:]
    passed = int(re.search(r"(\d+) passed", run.stdout).group(1))  # type: ignore[union-attr]
    assert passed >= 25, output[-2000:]
    # Skipped: only the crash tests a thread backend cannot run, with the reason.
    skips = re.findall(r"^SKIPPED \[(\d+)\] .*?: (.*)$", run.stdout, re.M)
    assert skips, output[-2000:]
    assert {reason for _, reason in skips} == {
        "the backend does not declare isolated workers with crash_detection"
    }
    # --procession-backend (procession's pytest11 plugin) retargets every subclass:
    # the forgetful class now tests the built-in threads backend, and passes.
    retargeted = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"),
            *("test_forgetful.py", "-k", "initializer", "--procession-backend=threads"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert retargeted.returncode == 0, retargeted.stdout[-3000:]
    assert "1 passed" in retargeted.stdout
