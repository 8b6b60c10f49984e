"""``procession bench --plot FILE``: bar charts of the side-by-side comparison."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
from click.testing import CliRunner

from procession import _plot
from procession.cli import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _payload(extra: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    def cell(backend: str, workload: str, seconds: float | None, **kw: Any) -> dict[str, Any]:
        return {"backend": backend, "workload": workload, "seconds": seconds, "workers": 2} | kw

    return {
        "python": "3.11.7",
        "cpus": 2,
        "sizes": {"words": 1000, "limit": 10000, "tasks": 100},
        "measurements": [
            cell("sequential", "palindromes", 1.0),
            cell("sequential", "count primes", 1.0),
            cell("sequential", "per-task overhead", 0.0001),
            cell("process", "startup", 0.05),
            cell("process", "palindromes", 0.5, speedup=2.0),
            cell("process", "count primes", 0.6, speedup=1.6),
            cell("process", "per-task overhead", 0.01),
            cell("threads", "startup", 0.001),
            cell("threads", "palindromes", None, error="the answer differs"),
            cell("threads", "count primes", 1.1, speedup=0.9),
            cell("threads", "per-task overhead", 0.002),
            *extra,
        ],
    }


def _bar_heights(ax: Any) -> list[float]:
    return [round(patch.get_height(), 6) for patch in ax.patches]


def test_figure_has_overhead_and_speedup_panels() -> None:
    fig = _plot.bench_figure(_payload())
    overhead, speedups = fig.axes
    assert "Per-task overhead (100 tasks)" in overhead.get_title()
    # One bar per backend, µs per task = seconds / tasks * 1e6, sequential left out.
    assert [t.get_text() for t in overhead.get_yticklabels()] == ["process", "threads"]
    assert sorted(round(p.get_width(), 3) for p in overhead.patches) == [20.0, 100.0]
    assert "speed-up" in speedups.get_title()
    assert [t.get_text() for t in speedups.get_xticklabels()] == ["palindromes", "count primes"]
    # process: 2.0, 1.6; threads: a failed cell (drawn empty), 0.9.
    assert _bar_heights(speedups) == [2.0, 1.6, 0.0, 0.9]
    assert "2 CPUs" in fig.get_suptitle()


def test_large_array_workloads_get_their_own_panel() -> None:
    extra = [
        {"backend": "sequential", "workload": "large arrays", "seconds": 1.0},
        {"backend": "process", "workload": "large arrays", "seconds": 0.4, "speedup": 2.5},
        {"backend": "threads", "workload": "large arrays", "seconds": 0.5, "speedup": 2.0},
    ]
    fig = _plot.bench_figure(_payload(extra))
    assert len(fig.axes) == 3
    large = fig.axes[2]
    assert "Large arrays" in large.get_title()
    assert _bar_heights(large) == [2.5, 2.0]
    assert "large arrays" not in [t.get_text() for t in fig.axes[1].get_xticklabels()]


@pytest.mark.timeout(120)
def test_bench_plot_writes_a_png_from_a_tiny_run(tmp_path: Path) -> None:
    image, data = tmp_path / "bench.png", tmp_path / "bench.json"
    result = CliRunner().invoke(
        cli,
        [
            *("bench", "--quick", "--backends", "serial,threads"),
            *("--words", "2000", "--limit", "20000", "--tasks", "20"),
            *("--json", str(data), "--plot", str(image)),
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {image}" in result.output
    assert image.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = matplotlib.image.imread(image).shape
    assert width > 2 * height > 300  # the side-by-side panels
    assert image.stat().st_size < 200_000
    # The same payload redraws the same panels.
    fig = _plot.bench_figure(json.loads(data.read_text()))
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["serial", "threads"]


def test_missing_matplotlib_fails_before_the_benchmark_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    ran: list[object] = []
    monkeypatch.setattr("procession.cli._bench_sequential", lambda *a: ran.append(a))
    result = CliRunner().invoke(
        cli, ["bench", "--quick", "--backends", "serial", "--plot", str(tmp_path / "x.png")]
    )
    assert result.exit_code == 1
    assert "pip install 'procession[plot]'" in result.output
    assert "Traceback" not in result.output
    assert ran == []  # refused up front, no benchmark was run
    assert not (tmp_path / "x.png").exists()
