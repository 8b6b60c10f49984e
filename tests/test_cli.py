"""The ``procession`` command line: each command prints what it claims."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import procession
from procession.cli import cli
from procession.workloads.palindromes import search_palindromes
from procession.workloads.sieve import prime_sieve


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_help_lists_every_command() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("demo", "run", "backends", "bench", "check"):
        assert command in result.output


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert procession.__version__ in result.output


def test_backends_lists_every_registered_backend() -> None:
    infos = procession.available_backends()
    result = invoke("backends")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    for name, info in infos.items():
        row = next(line for line in lines if line.split()[0] == name)
        assert (" yes " if info.usable else " no ") in row
        assert info.origin in row
        if not info.usable and info.install_hint:
            assert info.install_hint in row
        if info.usable and info.capabilities is not None and info.capabilities.isolated:
            assert "isolated" in row
    # the plug-in from the test distributions shows with its distribution
    assert "procession-example-backend" in result.output


def test_backends_json_matches_available_backends() -> None:
    result = invoke("backends", "--json")
    assert result.exit_code == 0
    payload = json.loads(result.output)
    infos = procession.available_backends()
    assert set(payload) == set(infos)
    for name, info in infos.items():
        assert payload[name]["usable"] is info.usable
        assert payload[name]["origin"] == info.origin


def test_run_sieve_prints_the_prime_count() -> None:
    result = invoke("run", "sieve", "--limit", "10000", "--backend", "threads", "--workers", "2")
    assert result.exit_code == 0, result.output
    assert "1,229 primes <= 10,000" in result.output
    assert "9,973" in result.output  # the largest prime below 10^4


def test_run_sieve_count_only() -> None:
    result = invoke("run", "sieve", "--limit", "1000000", "--count-only", "-b", "serial")
    assert result.exit_code == 0, result.output
    assert "78,498 primes <= 1,000,000 (counted)" in result.output


def test_run_palindromes_prints_what_it_found() -> None:
    expected = search_palindromes(20_000, 3, seed=5, backend="serial")
    result = invoke(
        "run", "palindromes", "--words", "20000", "--length", "3", "--seed", "5", "-b", "threads"
    )
    assert result.exit_code == 0, result.output
    assert f"{len(expected):,} palindromes in 20,000 words of 3 letters (seed 5)" in result.output
    assert ", ".join(expected[:5]) in result.output


def test_run_with_progress_bar() -> None:
    result = CliRunner().invoke(
        cli, ["run", "sieve", "--limit", "100000", "-b", "threads", "--progress"]
    )
    assert result.exit_code == 0, result.output
    assert f"{len(prime_sieve(100_000)):,} primes" in result.output
    # tqdm's bar, on stderr, with its total: the spans are a list
    assert re.search(r"\b(\d+)/\1 \[", result.stderr), result.stderr


def test_demo_prints_a_table_with_speedups() -> None:
    result = invoke(
        "demo", "--backend", "threads", "--workers", "2", "--words", "20000", "--limit", "200000"
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "backend 'threads', 2 workers" in out
    for label in (
        "palindromes in 20,000 words",
        "count primes <= 200,000",
        "list primes <= 200,000",
        "speed-up",
        "sequential",
    ):
        assert label in out
    assert f"{len(prime_sieve(200_000)):,} primes" in out
    assert " NO" not in out
    assert out.count("x ") + out.count("x\n") >= 3  # three speed-up cells such as 0.95x


def test_bench_quick_writes_json(tmp_path: Path) -> None:
    target = tmp_path / "bench.json"
    result = invoke("bench", "--quick", "--backends", "serial,threads", "--json", str(target))
    assert result.exit_code == 0, result.output
    for name in ("sequential", "serial", "threads", "per task"):
        assert name in result.output
    payload = json.loads(target.read_text())
    cells = {(m["backend"], m["workload"]): m for m in payload["measurements"]}
    for backend in ("sequential", "serial", "threads"):
        for workload in ("palindromes", "count primes", "list primes", "per-task overhead"):
            cell = cells[(backend, workload)]
            assert cell["error"] is None
            assert cell["seconds"] > 0
    assert cells[("threads", "startup")]["seconds"] >= 0
    assert payload["sizes"]["tasks"] > 0


def test_bench_reports_a_failing_backend_without_a_traceback() -> None:
    result = CliRunner().invoke(cli, ["bench", "--quick", "--backends", "serial,missing-one"])
    assert result.exit_code == 1
    assert "unknown backend 'missing-one'" in result.output
    assert "Traceback" not in result.output


def test_unknown_backend_is_one_line_and_exit_1() -> None:
    result = CliRunner().invoke(cli, ["run", "sieve", "--backend", "nope"])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("Error: unknown backend 'nope'")


def test_bad_option_value_exits_2() -> None:
    result = CliRunner().invoke(cli, ["run", "sieve", "--workers", "0"])
    assert result.exit_code == 2
    assert "--workers" in result.output


@pytest.fixture
def module_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "cli_check_target.py").write_text(
        textwrap.dedent(
            """
            import threading
            VALUE = {"a": [1, 2, 3]}
            LOCK = threading.Lock()
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_check_a_picklable_object(module_dir: Path) -> None:
    result = invoke("check", "cli_check_target:VALUE")
    assert result.exit_code == 0, result.output
    assert result.output.strip()


def test_check_an_unpicklable_object_exits_1(module_dir: Path) -> None:
    result = CliRunner().invoke(cli, ["check", "cli_check_target:LOCK"])
    assert result.exit_code == 1, result.output
    assert "lock" in result.output.lower()
    assert "Traceback" not in result.output


def test_check_a_bad_target_is_one_line() -> None:
    result = CliRunner().invoke(cli, ["check", "no_such_module_here:thing"])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert "no_such_module_here" in result.output


@pytest.mark.timeout(60)
def test_python_dash_m_procession_runs_and_fails_cleanly() -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    ok = subprocess.run(
        [sys.executable, "-m", "procession", "run", "sieve", "--limit", "100", "-b", "serial"],
        capture_output=True,
        text=True,
        timeout=50,
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    assert "25 primes <= 100" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "procession", "run", "sieve", "--backend", "nope"],
        capture_output=True,
        text=True,
        timeout=50,
        env=env,
    )
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    assert [line for line in bad.stderr.splitlines() if line.strip()] == [
        line for line in bad.stderr.splitlines() if line.startswith("Error: unknown backend 'nope'")
    ]
