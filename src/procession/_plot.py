"""Bar charts of ``procession bench`` results (``procession bench --plot FILE``).

matplotlib is an optional dependency (``pip install 'procession[plot]'``) and is
imported only here, only when a plot is asked for.  The figure is drawn with
matplotlib's object API on an Agg canvas, never through ``pyplot``: no GUI
backend is chosen and no global matplotlib state of the caller changes.

Input is the JSON payload ``bench --json`` writes (``measurements``: one dict per
backend x workload, with ``seconds``, ``speedup`` and ``error``), so a plot can
also be redrawn later from a saved file::

    import json
    from procession._plot import save_bench_plot
    save_bench_plot(json.load(open("bench.json")), "bench.png")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["INSTALL_HINT", "bench_figure", "require_matplotlib", "save_bench_plot"]

INSTALL_HINT = "pip install 'procession[plot]'"
# Workloads that are not compared as speed-ups against sequential.
_NOT_SPEEDUPS = ("startup", "per-task overhead")


def require_matplotlib() -> None:
    """Raise ImportError naming the install command if matplotlib is missing.

    Example::

        require_matplotlib()   # before a long benchmark whose results will be plotted
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"procession bench --plot draws with matplotlib, which is not installed "
            f"({exc}); fix: {INSTALL_HINT}"
        ) from None


def _ok(m: Mapping[str, Any]) -> bool:
    return m.get("error") is None and m.get("seconds") is not None


def _backends(measurements: Sequence[Mapping[str, Any]]) -> list[str]:
    names: list[str] = []
    for m in measurements:
        if m["backend"] != "sequential" and m["backend"] not in names:
            names.append(m["backend"])
    return names


def _speedup_workloads(measurements: Sequence[Mapping[str, Any]]) -> list[str]:
    names: list[str] = []
    for m in measurements:
        if m["workload"] not in _NOT_SPEEDUPS and m["workload"] not in names:
            names.append(m["workload"])
    return names


def _is_large_data(workload: str) -> bool:
    return any(word in workload.lower() for word in ("array", "large", "buffer"))


def _overhead_panel(ax: Axes, payload: Mapping[str, Any], backends: list[str]) -> None:
    tasks = payload.get("sizes", {}).get("tasks") or 1
    cells = {
        m["backend"]: m for m in payload["measurements"] if m["workload"] == "per-task overhead"
    }
    labels = [b for b in backends if b in cells and _ok(cells[b])]
    micros = [cells[b]["seconds"] / tasks * 1e6 for b in labels]
    bars = ax.barh(labels, micros, color="#4c72b0")
    ax.bar_label(bars, labels=[_micros(v) for v in micros], padding=3, fontsize=8)
    ax.invert_yaxis()
    # Backends differ by orders of magnitude (a pipe vs a cluster scheduler).
    ax.set_xscale("log")
    ax.set_xlabel("µs per task (chunksize=1, log scale), lower is better")
    ax.set_title(f"Per-task overhead ({tasks:,} tasks)", fontsize=10)
    if micros:
        ax.set_xlim(min(micros) / 2, max(micros) * 8)


def _micros(value: float) -> str:
    return f"{value:,.0f} µs" if value >= 100 else f"{value:.3g} µs"


def _speedup_panel(
    ax: Axes,
    payload: Mapping[str, Any],
    backends: list[str],
    workloads: list[str],
    title: str,
) -> None:
    cells = {(m["backend"], m["workload"]): m for m in payload["measurements"]}
    width = 0.8 / max(len(backends), 1)
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    for i, backend in enumerate(backends):
        values = []
        for workload in workloads:
            cell = cells.get((backend, workload))
            ok = cell is not None and _ok(cell) and cell.get("speedup") is not None
            values.append(float(cell["speedup"]) if ok and cell is not None else 0.0)
        xs = [x + (i - (len(backends) - 1) / 2) * width for x in range(len(workloads))]
        bars = ax.bar(xs, values, width, label=backend, color=palette(i % 10))
        ax.bar_label(
            bars,
            labels=[f"{v:.2f}" if v else "err" for v in values],
            fontsize=6,
            padding=1,
            rotation=90,
        )
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(workloads)), workloads, fontsize=8)
    ax.set_ylabel("speed-up vs sequential (higher is better)")
    ax.set_title(title, fontsize=10)
    ax.margins(y=0.15)
    ax.legend(fontsize=7, ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)


def bench_figure(payload: Mapping[str, Any]) -> Figure:
    """The figure for a ``bench --json`` payload: one panel per kind of comparison.

    Panels: per-task overhead (µs per task, one bar per backend); speed-ups of
    the compute workloads against the sequential run; and, when the results
    have them, speed-ups of the large-data workloads (names with "array",
    "large" or "buffer").  A failed cell is drawn as an empty bar marked "err".

    Example::

        fig = bench_figure(json.load(open("bench.json")))
        fig.savefig("bench.png")
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        require_matplotlib()
        raise
    measurements = payload["measurements"]
    backends = _backends(measurements)
    workloads = _speedup_workloads(measurements)
    compute = [w for w in workloads if not _is_large_data(w)]
    large = [w for w in workloads if _is_large_data(w)]
    panels = 1 + bool(compute) + bool(large)
    fig = Figure(figsize=(5.2 * panels, 4.6), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    _overhead_panel(axes[0], payload, backends)
    k = 1
    if compute:
        _speedup_panel(axes[k], payload, backends, compute, "Workloads: speed-up")
        k += 1
    if large:
        _speedup_panel(axes[k], payload, backends, large, "Large arrays: speed-up")
    machine = f"{payload.get('cpus', '?')} CPUs, Python {payload.get('python', '?')}"
    fig.suptitle(f"procession bench: backends side by side ({machine})", fontsize=11)
    return fig


def save_bench_plot(payload: Mapping[str, Any], path: str) -> None:
    """Draw :func:`bench_figure` for ``payload`` and write it to ``path``.

    The format follows the file name's extension (``.png``, ``.svg``, ``.pdf``).

    Example::

        save_bench_plot(json.load(open("bench.json")), "docs/images/bench.png")
    """
    require_matplotlib()
    fig = bench_figure(payload)
    # FigureCanvasAgg attaches itself to the figure: no pyplot, no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
