"""Every script in examples/ runs, at a small size, and prints something."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))


def test_there_are_examples() -> None:
    names = {path.name for path in EXAMPLES}
    assert {"article_manager_pids.py", "pool_palindromes.py"} <= names


@pytest.mark.timeout(100)
@pytest.mark.parametrize("script", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_runs_with_small(script: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(script), "--small"],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=script.parent.parent,
    )
    assert done.returncode == 0, f"{script.name} failed:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.strip(), f"{script.name} printed nothing"
