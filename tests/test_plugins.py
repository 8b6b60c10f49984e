"""Plug-ins found through entry points: an installed example, a broken one, the pytest plugin.

The distributions under tests/distributions/ and adapters/ are installed in
the development environment, so these tests exercise real entry points.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from procession_example_backend import Handle, InlineBackend

import procession
from procession import BackendUnavailableError
from procession.testing import _tasks


def _run_python(code: str, *, cwd: Path | None = None, timeout: float = 60) -> str:
    """Run ``code`` in a fresh interpreter (a fresh registry); return its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


# -- an installed plug-in ----------------------------------------------------------


def test_example_backend_is_discovered_and_runs_work() -> None:
    info = procession.available_backends()["example-inline"]
    assert info.usable
    assert info.origin == "distribution procession-example-backend"
    assert info.capabilities == procession.Capabilities(
        isolated=False, kill=False, crash_detection=False
    )
    got = list(procession.map(_tasks.square, range(7), backend="example-inline"))
    assert got == [x * x for x in range(7)]
    backend = procession.create_backend("example-inline")
    assert isinstance(backend, InlineBackend)
    assert list(procession.map(abs, [-1, -2], backend=backend)) == [1, 2]
    assert backend.tasks_run >= 1


def test_example_adapter_is_applied_from_its_entry_point() -> None:
    handle = Handle("sensor-7")
    got = list(procession.map(lambda i, h=handle: (i, h.name), range(3), backend="example-inline"))
    assert got == [(0, "sensor-7"), (1, "sensor-7"), (2, "sensor-7")]


def test_real_plugins_show_their_distribution() -> None:
    infos = procession.available_backends()
    assert infos["ray"].origin == "distribution procession-ray"
    for name in ("serial", "threads", "process"):
        assert infos[name].origin == "built-in"


# -- a broken plug-in --------------------------------------------------------------


def test_broken_plugin_backends_are_listed_with_a_clear_error() -> None:
    infos = procession.available_backends()
    broken = infos["broken-import"]
    assert not broken.usable
    assert broken.origin == "distribution procession-broken-plugin"
    assert broken.error is not None
    assert "procession-broken-plugin" in broken.error
    assert "ModuleNotFoundError" in broken.error
    not_a_backend = infos["not-a-backend"]
    assert not not_a_backend.usable
    assert not_a_backend.error is not None
    assert "procession-broken-plugin" in not_a_backend.error
    assert "not a procession.Backend subclass" in not_a_backend.error


@pytest.mark.parametrize("name", ["broken-import", "not-a-backend"])
def test_using_a_broken_backend_names_the_distribution(name: str) -> None:
    with pytest.raises(BackendUnavailableError, match="procession-broken-plugin"):
        procession.create_backend(name)
    with pytest.raises(BackendUnavailableError, match=r"fix or uninstall|failed to load"):
        list(procession.map(abs, [1], backend=name))


def test_broken_plugin_does_not_break_procession() -> None:
    # A fresh interpreter: the first registry lookup reads every entry point.
    out = _run_python(
        """
        import procession
        import procession.testing.plugin
        infos = procession.available_backends()
        print(sorted(n for n, i in infos.items() if not i.usable))
        print(list(procession.map(abs, [-1, -2], backend="threads")))
        print(list(procession.map(abs, [-3], backend="example-inline")))
        """
    )
    unusable, threads, inline = out.strip().splitlines()[-3:]
    assert "'broken-import'" in unusable
    assert "'not-a-backend'" in unusable
    assert "'threads'" not in unusable
    assert threads == "[1, 2]"
    assert inline == "[3]"


def test_cli_lists_plugins_with_their_origin() -> None:
    out = _run_python(
        """
        import sys
        from procession.cli import main
        sys.argv = ["procession", "backends"]
        try:
            main()
        except SystemExit as exit:
            assert not exit.code, exit.code
        """
    )
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "distribution procession-ray" in lines["ray"]
    assert "distribution procession-example-backend" in lines["example-inline"]
    assert "procession-broken-plugin" in lines["broken-import"]


# -- the pytest plugin (entry point pytest11) ---------------------------------------


def test_pytest_plugin_imports_nothing_heavy() -> None:
    out = _run_python(
        """
        import sys
        import procession.testing.plugin
        heavy = ["hypothesis", "cloudpickle", "procession.testing.conformance",
                 "procession.api", "ray", "h5py", "duckdb"]
        print([name for name in heavy if name in sys.modules])
        """
    )
    assert out.strip() == "[]"


def _pytest(project: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=project,
        env=env,
        check=False,
    )


@pytest.mark.timeout(120)
def test_pytest_plugin_adds_no_tests_or_fixtures_to_other_projects(tmp_path: Path) -> None:
    (tmp_path / "test_other.py").write_text("def test_one():\n    assert True\n")
    run = _pytest(tmp_path, "-q")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout
    fixtures = _pytest(tmp_path, "-q", "--fixtures")
    assert fixtures.returncode == 0, fixtures.stdout + fixtures.stderr
    assert "conformance" not in fixtures.stdout
    assert "procession" not in fixtures.stdout
    # It is loaded, though: its one option is there.
    assert "--procession-backend" in _pytest(tmp_path, "--help").stdout


def test_broken_adapter_plugin_warns_naming_its_distribution(tmp_path: Path) -> None:
    # A distribution known only by its metadata, as an installer leaves it: its
    # adapter hook names a module that does not exist.
    info = tmp_path / "procession_bad_adapters-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: procession-bad-adapters\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(
        "[procession.adapters]\nbad = procession_bad_adapters_missing:register\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-W",
            "always::RuntimeWarning",
            "-c",
            "import procession\n"
            "procession.check_picklable([1, 2])\n"
            "print(list(procession.map(abs, [-5], backend='threads')))\n",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[5]"
    assert "RuntimeWarning" in done.stderr
    assert "procession-bad-adapters" in done.stderr
    assert "'bad'" in done.stderr
