"""Run CPython's own ``concurrent.futures`` executor tests against ``procession.Executor``.

CPython ships its executor tests as ``test.test_concurrent_futures`` (a package
since 3.12; many distributions strip the ``test`` package, so this script looks
for an interpreter that has it).  The test classes are written as mixins over
an ``executor_type``; this script builds them with ``procession.Executor`` on a
given backend instead of ``ProcessPoolExecutor``, runs them with unittest, and
prints one summary line per backend.  No CPython test code is copied here.

Usage (from the repository root)::

    python tools/run_cpython_futures_tests.py                       # find a Python with the tests
    python tools/run_cpython_futures_tests.py --python /path/to/python3.13 \\
        --backends process,loky,multiprocessing -k test_cancel

It makes a throwaway virtual environment with ``uv`` (procession installed
from this checkout, plus loky and psutil) and runs the tests there, one backend per
child process.  Exit status: 0 when every selected test passed, 1 otherwise,
2 when no interpreter with the test package was found (nothing was run).

Tests that read ``ProcessPoolExecutor``'s private attributes (its
``_processes``, ``_executor_manager_thread``, its wake-up pipe) are left out:
they test CPython's implementation, not the ``Executor`` contract.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "test/test_concurrent_futures/__init__.py"
# The test classes the issue names, by module of test.test_concurrent_futures.
SUITES = {
    "executor": "ExecutorTest",
    "test_wait": "WaitTests",
    "test_as_completed": "AsCompletedTests",
    "test_init": "InitializerMixin",
    "test_shutdown": "ExecutorShutdownTest",
    "test_deadlock": "ExecutorDeadlockTest",
}
# Tests that read ProcessPoolExecutor's private attributes or mock its internals.
PRIVATE = {
    "test_shutdown_deadlock_pickle": "reads executor._executor_manager_thread",
    "test_gh105829_should_not_deadlock_if_wakeup_pipe_full": "mocks _ThreadWakeup internals",
}
DEFAULT_BACKENDS = "process,loky,multiprocessing"

# Loaded by a .pth file at every start of the throwaway environment's Python, so
# that scripts the tests run in child interpreters (``from concurrent.futures
# import <executor_type.__name__>``) find procession's executors there too.
SHIM = '''
"""procession executors as concurrent.futures.Procession<Backend>Executor (tests only)."""
import concurrent.futures as _futures

_NAMES = {"ProcessionProcessExecutor": "process", "ProcessionLokyExecutor": "loky",
          "ProcessionMultiprocessingExecutor": "multiprocessing"}
_original_getattr = _futures.__getattr__


def _make(name, backend):
    import procession

    class Executor(procession.Executor):
        def __init__(self, max_workers=None, mp_context=None, initializer=None,
                     initargs=(), max_tasks_per_child=None):
            super().__init__(backend, max_workers=max_workers, mp_context=mp_context,
                             initializer=initializer, initargs=initargs,
                             max_tasks_per_child=max_tasks_per_child)

    Executor.__name__ = Executor.__qualname__ = name
    Executor.__module__ = "concurrent.futures"
    return Executor


def __getattr__(name):
    if name in _NAMES:
        value = _make(name, _NAMES[name])
        setattr(_futures, name, value)
        return value
    return _original_getattr(name)


_futures.__getattr__ = __getattr__
'''

# Runs inside the throwaway environment: build the test classes, run them.
INNER = """
import importlib, sys, unittest
from concurrent import futures
from test.test_concurrent_futures import util


def main():
    backend, pattern = sys.argv[1], sys.argv[2]
    suites = {suites!r}
    private = {private!r}
    executor_type = getattr(futures, "Procession" + backend.capitalize() + "Executor")

    class ProcessionMixin(util.ExecutorMixin):
        pass

    ProcessionMixin.executor_type = executor_type
    # Our backends choose their own start method; no ``ctx`` attribute, so the
    # tests that would switch the global start method leave it alone.
    ProcessionMixin.get_context = lambda self: None

    loader = unittest.TestLoader()
    if pattern:
        loader.testNamePatterns = ["*" + pattern + "*"]
    suite = unittest.TestSuite()
    for module_name, class_name in suites.items():
        module = importlib.import_module("test.test_concurrent_futures." + module_name)
        mixin = getattr(module, class_name)
        if hasattr(mixin, "TIMEOUT"):
            mixin.TIMEOUT = 60  # a deadlock fails in a minute, not in five
        # The classes live in this script, not in CPython's modules, so their
        # setUpModule does not run: its clean-up stops multiprocessing's fork server
        # and resource tracker for the whole process, which only CPython's runner wants.
        case = type(class_name + "_" + backend, (mixin, ProcessionMixin, util.BaseTestCase),
                    {{"__module__": __name__}})
        for test in loader.loadTestsFromTestCase(case):
            method = test._testMethodName
            if method in private:
                skip = unittest.skip("private: " + private[method])
                setattr(case, method, skip(getattr(case, method)))
            suite.addTest(test)
    result = unittest.TextTestRunner(verbosity=1, stream=sys.stdout).run(suite)
    failed = [t.id() for t, _ in result.failures + result.errors]
    print("SUMMARY", backend, "run", result.testsRun, "failed", len(failed),
          "skipped", len(result.skipped), flush=True)
    for test_id in failed:
        print("FAILED", test_id, flush=True)
    sys.stdout.flush()
    # Futures the tests left unfinished (a deadlock they detected) would hold up
    # the exit drain forever: leave now, the results are out.
    import os
    os._exit(1 if failed else 0)


# Workers of the multiprocessing backend import this script again (as the
# standard library does): only the main process runs the tests.
if __name__ == "__main__":
    main()
"""


def find_python(explicit: str | None) -> str | None:
    """An interpreter whose standard library has test.test_concurrent_futures."""
    candidates = [explicit] if explicit else []
    candidates += [sys.executable]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[2-9]*/bin/python3")))
    candidates += sorted(glob.glob("/usr/bin/python3.1[2-9]"))
    for python in candidates:
        if not python or not os.path.exists(python):
            continue
        probe = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"],
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0 and Path(probe.stdout.strip(), PACKAGE).exists():
            return python
    return None


def make_environment(python: str, where: Path) -> Path:
    """A throwaway venv with procession (installed from this checkout, not editable:
    the checkout may change while the tests run), loky and psutil, plus the shim."""
    venv = where / "venv"
    subprocess.run(["uv", "venv", "-q", "-p", python, str(venv)], check=True)
    bin_python = venv / "bin" / "python"
    subprocess.run(
        ["uv", "pip", "install", "-q", "-p", str(bin_python), str(ROOT), "loky", "psutil"],
        check=True,
    )
    site = subprocess.run(
        [str(bin_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "_procession_futures_shim.py").write_text(textwrap.dedent(SHIM))
    Path(site, "_procession_futures_shim.pth").write_text("import _procession_futures_shim\n")
    return bin_python


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", help="an interpreter with test.test_concurrent_futures")
    parser.add_argument("--backends", default=DEFAULT_BACKENDS)
    parser.add_argument("-k", default="", help="only tests whose name contains this")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per backend")
    args = parser.parse_args()

    python = find_python(args.python)
    if python is None:
        print("no Python with test.test_concurrent_futures found; nothing run", file=sys.stderr)
        return 2
    inner = INNER.format(suites=SUITES, private=PRIVATE)
    status = 0
    with tempfile.TemporaryDirectory(prefix="procession-cpython-tests-") as tmp:
        bin_python = make_environment(python, Path(tmp))
        script = Path(tmp, "inner.py")
        script.write_text(inner)
        for backend in args.backends.split(","):
            print(f"== {backend} ({python})", flush=True)
            try:
                done = subprocess.run(
                    [str(bin_python), "-u", str(script), backend, args.k],
                    cwd=tmp,
                    timeout=args.timeout,
                )
            except subprocess.TimeoutExpired:
                print(f"SUMMARY {backend} timed out after {args.timeout}s", flush=True)
                status = 1
                continue
            status = status or (1 if done.returncode else 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
