"""The ``procession`` command line (also ``python -m procession``).

    procession demo                      both workloads, parallel against sequential
    procession run palindromes|sieve     one workload, with --backend/--workers/--progress
    procession backends                  every registered backend: usable?, capabilities
    procession bench                     backends side by side (table, --json FILE, --plot FILE)
    procession check MODULE:ATTR         why an object does not pickle, and the fix

Errors a user can fix (an unknown backend, a bad option, a missing
dependency) print one line and exit 1; click's usage errors exit 2.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from procession.backends.base import Backend

__all__ = ["cli", "main"]

T = TypeVar("T")

# Sizes: "demo" takes a few seconds on two cores; "bench --quick" well under one.
DEMO_WORDS = 8_000_000
DEMO_LIMIT = 100_000_000
WORD_LENGTH = 5
BENCH_SIZES = {"words": 4_000_000, "limit": 50_000_000, "tasks": 2_000}
QUICK_SIZES = {"words": 100_000, "limit": 1_000_000, "tasks": 100}


class _Cli(click.Group):
    """A group that turns the errors a user can fix into one line and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        from procession.errors import ProcessionError

        try:
            return super().invoke(ctx)
        except (ProcessionError, ValueError, OSError, ImportError) as exc:
            raise click.ClickException(_one_line(exc)) from None


def _one_line(exc: BaseException) -> str:
    return _shorten(str(exc), 400) or type(exc).__name__


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def _best_of(repeat: int, fn: Callable[[], T]) -> tuple[T, float]:
    """The result and the fastest of ``repeat`` timings (the least disturbed run)."""
    result, best = _timed(fn)
    for _ in range(repeat - 1):
        result, seconds = _timed(fn)
        best = min(best, seconds)
    return result, best


def _identity(x: T) -> T:
    return x


def _check_backend(name: str | None) -> str:
    """The backend name to use, validated now so a typo fails before any work."""
    from procession.api import default_backend_name
    from procession.backends.registry import get_backend_class

    chosen = name or default_backend_name()
    get_backend_class(chosen)
    return chosen


def _warm_up(backend: str | Backend, workers: int | None) -> float:
    """Start the pool (outside the timings) and return how long that took."""
    from procession.api import map as parallel_map
    from procession.api import resolve_backend

    pool = resolve_backend(backend, workers)
    _, seconds = _timed(
        lambda: list(
            parallel_map(
                _identity, range(2 * pool.workers), backend=backend, workers=workers, chunksize=1
            )
        )
    )
    return seconds


def _pool_size(backend: str | Backend, workers: int | None) -> int:
    from procession.api import resolve_backend

    return resolve_backend(backend, workers).workers


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _compare(
    label: str,
    sequential: Callable[[], T],
    parallel: Callable[[], T],
    describe: Callable[[T], str],
) -> list[str]:
    """Time both versions of a workload; one table row, checking they agree."""
    expected, t_seq = _timed(sequential)
    got, t_par = _timed(parallel)
    same = "yes" if got == expected else "NO"
    return [label, _seconds(t_seq), _seconds(t_par), _speedup(t_seq, t_par), describe(got), same]


def _speedup(sequential: float | None, parallel: float | None) -> str:
    if not sequential or not parallel:
        return "-"
    return f"{sequential / parallel:.2f}x"


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="procession")
def cli() -> None:
    """procession: one parallel map / pipeline API over pluggable backends."""


backend_option = click.option(
    "--backend",
    "-b",
    default=None,
    metavar="NAME",
    help="Backend name (default: $PROCESSION_BACKEND or 'process'); see 'procession backends'.",
)
workers_option = click.option(
    "--workers",
    "-w",
    type=click.IntRange(min=1),
    default=None,
    help="Worker count (default: the CPUs this process may use).",
)


# -- demo ---------------------------------------------------------------------


@cli.command()
@backend_option
@workers_option
@click.option(
    "--words",
    type=click.IntRange(min=0),
    default=DEMO_WORDS,
    show_default=True,
    help="Random words to search for palindromes.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=DEMO_LIMIT,
    show_default=True,
    help="Sieve the primes up to this number.",
)
def demo(backend: str | None, workers: int | None, words: int, limit: int) -> None:
    """Both reference workloads on a backend, timed against sequential.

    Sequential is the same kernel run in this process, so the speed-up shown is
    what the backend adds, not a slower baseline.
    """
    from procession.workloads import palindromes, sieve

    name = _check_backend(backend)
    startup = _warm_up(name, workers)
    pool = _pool_size(name, workers)
    click.echo(
        f"procession demo: backend {name!r}, {pool} workers "
        f"(pool started in {startup:.2f} s, not counted below); "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    click.echo("")

    seed = 2009
    rows = [
        _compare(
            f"palindromes in {words:,} words",
            lambda: palindromes.WordSource(WORD_LENGTH, seed).palindromes(0, words),
            lambda: palindromes.search_palindromes(
                words, WORD_LENGTH, seed=seed, backend=name, workers=workers
            ),
            lambda found: f"{len(found):,} found",
        ),
        _compare(
            f"count primes <= {limit:,}",
            lambda: sieve.segmented_count(limit),
            lambda: sieve.count_primes(limit, backend=name, workers=workers),
            lambda count: f"{count:,} primes",
        ),
        _compare(
            f"list primes <= {limit:,}",
            lambda: sieve.segmented_sieve(limit),
            lambda: sieve.primes_up_to(limit, backend=name, workers=workers),
            lambda primes: (
                f"{len(primes):,} primes" + (f", largest {primes[-1]:,}" if primes else "")
            ),
        ),
    ]

    click.echo(
        _table(
            ["workload", "sequential", f"{name} x{pool}", "speed-up", "result", "same answer"],
            rows,
            right={1, 2, 3},
        )
    )
    click.echo("")
    click.echo(
        "Words are generated inside the workers from a recipe and the sieve's base "
        "primes are built once per worker: only index ranges travel."
    )
    if any(row[-1] != "yes" for row in rows):
        raise click.ClickException("a parallel result differs from the sequential one")


# -- run ------------------------------------------------------------------------


@cli.command()
@click.argument("workload", type=click.Choice(["palindromes", "sieve"]))
@backend_option
@workers_option
@click.option(
    "--words",
    type=click.IntRange(min=0),
    default=1_000_000,
    show_default=True,
    help="palindromes: how many random words.",
)
@click.option(
    "--length",
    type=click.IntRange(min=0),
    default=WORD_LENGTH,
    show_default=True,
    help="palindromes: letters per word.",
)
@click.option("--seed", type=int, default=None, help="palindromes: random seed (default: random).")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=10_000_000,
    show_default=True,
    help="sieve: find the primes up to this number.",
)
@click.option("--count-only", is_flag=True, help="sieve: count the primes, do not collect them.")
@click.option("--progress/--no-progress", default=False, help="Show a progress bar.")
def run(
    workload: str,
    backend: str | None,
    workers: int | None,
    words: int,
    length: int,
    seed: int | None,
    limit: int,
    count_only: bool,
    progress: bool,
) -> None:
    """Run one reference workload and print what it found."""
    from procession.workloads import palindromes, sieve

    name = _check_backend(backend)
    if workload == "palindromes":
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        found, seconds = _timed(
            lambda: palindromes.search_palindromes(
                words, length, seed=seed, backend=name, workers=workers, progress=progress
            )
        )
        pool = _pool_size(name, workers)
        sample = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        click.echo(
            f"{len(found):,} palindromes in {words:,} words of {length} letters "
            f"(seed {seed}) in {seconds:.3f} s on {name!r} x{pool}"
        )
        if found:
            click.echo(f"first: {sample}")
        return
    pool = _pool_size(name, workers)
    if count_only:
        count, seconds = _timed(
            lambda: sieve.count_primes(limit, backend=name, workers=workers, progress=progress)
        )
        click.echo(
            f"{count:,} primes <= {limit:,} (counted) in {seconds:.3f} s on {name!r} x{pool}"
        )
        return
    primes, seconds = _timed(
        lambda: sieve.primes_up_to(limit, backend=name, workers=workers, progress=progress)
    )
    click.echo(f"{len(primes):,} primes <= {limit:,} in {seconds:.3f} s on {name!r} x{pool}")
    if primes:
        tail = ", ".join(f"{p:,}" for p in primes[-3:])
        click.echo(f"largest: {tail}")


# -- backends -------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def backends(as_json: bool) -> None:
    """Every registered backend (built-in and plug-in) and whether it is usable here."""
    from procession.api import default_backend_name
    from procession.backends._resources import RESOURCE_OPTIONS
    from procession.backends.registry import available_backends

    infos = available_backends()
    default = default_backend_name()
    if as_json:
        payload = {
            name: {
                "usable": info.usable,
                "installed": info.installed,
                "capabilities": info.capabilities.names() if info.capabilities else None,
                "origin": info.origin,
                "default_serializer": info.default_serializer,
                "install_hint": info.install_hint,
                "error": info.error,
                "default": name == default,
                # The resource options (memory_limit=, threads_per_worker=, env=) it accepts.
                "resources": [n for n in RESOURCE_OPTIONS if getattr(info.capabilities, n)]
                if info.capabilities
                else None,
            }
            for name, info in infos.items()
        }
        click.echo(json.dumps(payload, indent=2))
        return
    rows = []
    for name, info in infos.items():
        if info.capabilities is None:
            caps = resources = "?"
        else:
            names = info.capabilities.names()
            caps = ", ".join(n for n in names if n not in RESOURCE_OPTIONS) or "in-process"
            resources = ", ".join(n for n in names if n in RESOURCE_OPTIONS) or "-"
        if info.usable:
            note = f"serializer {info.default_serializer}" if info.default_serializer else ""
        else:
            note = _shorten(info.error or "not usable", 110)
            if info.install_hint:
                note = f"install: {info.install_hint} ({note})"
        label = f"{name} (default)" if name == default else name
        rows.append(
            [label, "yes" if info.usable else "no", caps or "-", resources, info.origin, note]
        )
    headers = ["backend", "usable", "capabilities", "resource options", "origin", "notes"]
    click.echo(_table(headers, rows, right=set()))


# -- bench ----------------------------------------------------------------------


@dataclass
class Measurement:
    """One cell of ``procession bench``: a backend on a workload."""

    backend: str
    workload: str
    seconds: float | None
    workers: int | None = None
    speedup: float | None = None
    error: str | None = None


def _bench_backend(
    name: str, workers: int | None, sizes: dict[str, int], seed: int, repeat: int
) -> tuple[list[Measurement], dict[str, Any]]:
    """Time every workload on one backend (its own pool, started outside the timings)."""
    from procession.api import map as parallel_map
    from procession.backends.registry import create_backend
    from procession.workloads import palindromes, sieve

    results: list[Measurement] = []
    answers: dict[str, Any] = {}
    try:
        pool = create_backend(name, workers=workers)
    except Exception as exc:
        return [Measurement(name, "startup", None, error=_one_line(exc))], answers
    try:
        startup = _warm_up(pool, None)
        results.append(Measurement(name, "startup", startup, pool.workers))
        cases: list[tuple[str, Callable[[], Any]]] = [
            (
                "palindromes",
                lambda: palindromes.search_palindromes(
                    sizes["words"], WORD_LENGTH, seed=seed, backend=pool
                ),
            ),
            ("count primes", lambda: sieve.count_primes(sizes["limit"], backend=pool)),
            ("list primes", lambda: len(sieve.primes_up_to(sizes["limit"], backend=pool))),
            (
                "per-task overhead",
                lambda: len(
                    list(parallel_map(_identity, range(sizes["tasks"]), backend=pool, chunksize=1))
                ),
            ),
        ]
        for workload, case in cases:
            try:
                answer, seconds = _best_of(repeat, case)
            except Exception as exc:
                results.append(
                    Measurement(name, workload, None, pool.workers, error=_one_line(exc))
                )
                continue
            answers[workload] = answer
            results.append(Measurement(name, workload, seconds, pool.workers))
    finally:
        pool.shutdown(wait=False, kill=True)
    return results, answers


def _bench_sequential(
    sizes: dict[str, int], seed: int, repeat: int
) -> tuple[list[Measurement], dict[str, Any]]:
    from procession.workloads import palindromes, sieve

    cases: list[tuple[str, Callable[[], Any]]] = [
        (
            "palindromes",
            lambda: palindromes.WordSource(WORD_LENGTH, seed).palindromes(0, sizes["words"]),
        ),
        ("count primes", lambda: sieve.segmented_count(sizes["limit"])),
        ("list primes", lambda: len(sieve.segmented_sieve(sizes["limit"]))),
        ("per-task overhead", lambda: len([_identity(i) for i in range(sizes["tasks"])])),
    ]
    results, answers = [], {}
    for workload, case in cases:
        answer, seconds = _best_of(repeat, case)
        answers[workload] = answer
        results.append(Measurement("sequential", workload, seconds, 1))
    return results, answers


@cli.command()
@click.option(
    "--backends",
    "names",
    default=None,
    metavar="A,B,...",
    help="Backends to compare (default: every usable one).",
)
@workers_option
@click.option("--quick", is_flag=True, help="Small sizes (a smoke test, not a measurement).")
@click.option(
    "--words",
    type=click.IntRange(min=0),
    default=None,
    help=f"Palindrome words [default {BENCH_SIZES['words']:,}].",
)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=None,
    help=f"Sieve limit [default {BENCH_SIZES['limit']:,}].",
)
@click.option(
    "--tasks",
    type=click.IntRange(min=1),
    default=None,
    help=f"Tasks in the per-task-overhead case [default {BENCH_SIZES['tasks']:,}].",
)
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=None,
    help="Time each case this many times and keep the fastest [default 3; 1 with --quick].",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Also write the measurements as JSON to this file ('-' for stdout).",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Also draw the comparison as bar charts to this image file (.png, .svg, .pdf); "
    "needs matplotlib: pip install 'procession[plot]'.",
)
def bench(
    names: str | None,
    workers: int | None,
    quick: bool,
    words: int | None,
    limit: int | None,
    tasks: int | None,
    repeat: int | None,
    json_path: str | None,
    plot_path: str | None,
) -> None:
    """Backends side by side on the workloads and a per-task-overhead case.

    Each backend gets its own pool, started before the clock runs; the
    sequential row is the same kernels in this process.  The overhead case maps
    an identity function over --tasks items one task each: seconds / tasks is
    the round-trip cost per task.  --plot draws per-task overhead and the
    speed-ups as bar charts (matplotlib).
    """
    from procession.backends.registry import available_backends

    if plot_path is not None:
        from procession._plot import require_matplotlib

        require_matplotlib()  # before the benchmark runs, not after

    sizes = dict(QUICK_SIZES if quick else BENCH_SIZES)
    for key, value in (("words", words), ("limit", limit), ("tasks", tasks)):
        if value is not None:
            sizes[key] = value
    if names:
        chosen = [n.strip() for n in names.split(",") if n.strip()]
        for name in chosen:
            _check_backend(name)
    else:
        chosen = [name for name, info in available_backends().items() if info.usable]
    seed = 2009
    if repeat is None:
        repeat = 1 if quick else 3
    measurements, expected = _bench_sequential(sizes, seed, repeat)
    baseline: dict[str, float | None] = {m.workload: m.seconds for m in measurements}
    for name in chosen:
        results, answers = _bench_backend(name, workers, sizes, seed, repeat)
        for m in results:
            if m.workload in answers and answers[m.workload] != expected[m.workload]:
                m.error = "the answer differs from the sequential one"
            base = baseline.get(m.workload)
            if m.seconds and base and m.workload not in ("startup", "per-task overhead"):
                m.speedup = base / m.seconds
        measurements.extend(results)

    workloads = ["palindromes", "count primes", "list primes", "per-task overhead", "startup"]
    headers = [
        "backend",
        "workers",
        f"palindromes ({sizes['words']:,} words)",
        f"count primes <= {sizes['limit']:,}",
        f"list primes <= {sizes['limit']:,}",
        f"per task ({sizes['tasks']:,} tasks)",
        "pool start",
    ]
    rows = []
    errors = []
    for backend_name in ["sequential", *chosen]:
        cells = {m.workload: m for m in measurements if m.backend == backend_name}
        row = [backend_name, str(next((m.workers for m in cells.values() if m.workers), "-"))]
        for workload in workloads:
            cell = cells.get(workload)
            if cell is None:
                row.append("-")
            elif cell.error:
                row.append("error")
                errors.append(f"{backend_name} / {workload}: {cell.error}")
            elif workload == "per-task overhead" and cell.seconds is not None:
                micros = cell.seconds / sizes["tasks"] * 1e6
                row.append(f"{micros:.1f} us" if micros < 10 else f"{micros:.0f} us")
            elif cell.speedup is not None:
                row.append(f"{_seconds(cell.seconds)} ({cell.speedup:.2f}x)")
            else:
                row.append(_seconds(cell.seconds))
        rows.append(row)
    click.echo(_table(headers, rows, right={1, 2, 3, 4, 5, 6}))
    click.echo("(speed-up against the sequential row in parentheses)")
    for line in errors:
        click.echo(f"error: {line}")

    payload = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "sizes": sizes,
        "repeat": repeat,
        "measurements": [asdict(m) for m in measurements],
    }
    if json_path is not None:
        text = json.dumps(payload, indent=2)
        if json_path == "-":
            click.echo(text)
        else:
            with open(json_path, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
            click.echo(f"wrote {json_path}")
    if plot_path is not None:
        from procession._plot import save_bench_plot

        save_bench_plot(payload, plot_path)
        click.echo(f"wrote {plot_path}")
    if errors:
        sys.exit(1)


# -- check ----------------------------------------------------------------------


@cli.command()
@click.argument("target", metavar="MODULE:ATTR")
@click.option(
    "--threshold",
    default=None,
    metavar="SIZE",
    help="Size from which buffers go through shared memory (default: "
    "$PROCESSION_SHM_THRESHOLD or 1MiB), for the out-of-band lines.",
)
def check(target: str, threshold: str | None) -> None:
    """Say whether MODULE:ATTR can be sent to a worker, and if not why and how to fix it.

    Also lists the large buffers that would travel through shared memory.
    """
    from procession.serialization import diagnostics

    report = getattr(diagnostics, "check_report", None)
    if report is None:
        ok, text = _basic_check(target)
    else:
        ok, text = report(target, threshold=threshold)
    click.echo(text)
    if not ok:
        sys.exit(1)


def _basic_check(target: str) -> tuple[bool, str]:
    """A minimal ``check`` for when the diagnostics module has no check_report yet."""
    import importlib

    from procession.errors import SerializationError
    from procession.serialization.diagnostics import check_picklable

    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:ATTR, got {target!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    try:
        check_picklable(obj)
    except SerializationError as exc:
        return False, f"{target}: does not pickle: {exc}"
    return True, f"{target}: pickles with cloudpickle"


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``procession`` script."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="procession")
