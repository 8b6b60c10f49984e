"""Resource control for worker processes: ``memory_limit=``, ``threads_per_worker=``, ``env=``.

Three options every process backend accepts, handled here once so that each
backend only adds a few hooks:

    parent process                                        worker process
    ──────────────                                        ──────────────
    ResourceControl.resolve(...)  validated options       apply_in_worker(settings):
      .worker_settings() ─── picklable WorkerSettings ──►   os.environ.update(env + thread vars)
      .watch(backend)  ──► one watcher thread per process   threadpoolctl caps loaded libraries
                           polls each worker's RSS (psutil)  ... then the worker runtime starts
                           over memory_limit: SIGKILL it
      .crash_error(msg, pid, exitcode) ◄── backend buries a dead worker
           WorkerMemoryError (we stopped it), "probably out of memory" (the
           kernel's SIGKILL after a high last-seen RSS), else WorkerCrashedError

- ``memory_limit``: bytes, or a string such as ``"2GiB"``/``"500MB"``.  The
  watcher in the parent measures each worker's resident set size (with its
  child processes) every :data:`POLL_SECONDS_LIMITED` seconds; a worker above
  the limit is killed (the backend replaces it, as after any crash) and the
  task it ran fails with :class:`~procession.errors.WorkerMemoryError`.  The
  limit is checked by sampling: a task that allocates very fast may overshoot
  it briefly before it is stopped.
- ``threads_per_worker``: caps the BLAS/OpenMP thread pools in each worker:
  with threadpoolctl for libraries already loaded, and with the usual
  environment variables (``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ...) for
  libraries loaded later.  ``"auto"`` (the default) is ``cores // workers``,
  at least 1, as joblib does for loky; ``None`` leaves the libraries alone.
- ``env``: environment variables set inside each worker before any task (or
  initializer) runs, so they reach workers started later by a forkserver that
  never saw the parent's own later changes.

Without any limit the watcher still samples workers every
:data:`POLL_SECONDS_IDLE` seconds, so that a worker the kernel's OOM killer
takes is reported as "killed by SIGKILL, probably out of memory: last seen at
N MiB" rather than as a bare signal.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from procession.errors import WorkerCrashedError, WorkerMemoryError

if TYPE_CHECKING:
    from procession.backends.base import Backend

__all__ = [
    "RESOURCE_OPTIONS",
    "THREAD_ENV_VARS",
    "ResourceControl",
    "WorkerSettings",
    "apply_in_worker",
    "apply_once",
    "check_supported",
    "format_size",
    "parse_size",
]

#: The keyword names of the three options (also the names of the capabilities).
RESOURCE_OPTIONS = ("memory_limit", "threads_per_worker", "env")

#: Variables read by BLAS/OpenMP libraries when they load (the list joblib uses for loky).
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMBA_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)

#: How often the watcher samples workers when some pool has a memory_limit.
POLL_SECONDS_LIMITED = 0.1
#: ... and when none has (only to explain a later SIGKILL).
POLL_SECONDS_IDLE = 0.5
#: A worker the kernel SIGKILLed is "probably out of memory" when it was last seen
#: using at least this fraction of the memory the machine (or its cgroup) allows,
#: or at least this fraction of its own memory_limit.
OOM_SUSPECT_FRACTION = 0.10
OOM_SUSPECT_LIMIT_FRACTION = 0.8
#: How often the child processes of a worker are listed again (they count in its size).
CHILDREN_SECONDS = 1.0
#: How long a dead worker's last sample is kept for the backend to ask about it.
_SAMPLE_KEEP_SECONDS = 60.0

MIB = 1024**2
_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_ACCEPTED_SIZES = (
    "a positive int (bytes) or a string of a number and a unit: B, kB, MB, GB, TB "
    "(powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. '2GiB' or '500MB'"
)

ThreadsOption = int | None | Literal["auto"]


# -- values ---------------------------------------------------------------------------


def parse_size(value: object, *, option: str = "memory_limit") -> int:
    """Bytes from an int or a string such as ``"2GiB"``; ValueError naming the accepted forms.

    Example::

        >>> parse_size("1.5 GiB"), parse_size("500MB"), parse_size(4096)
        (1610612736, 500000000, 4096)
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value > 0:
            return value
    elif isinstance(value, str):
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else ""
        if match and unit in _UNITS:
            size = int(float(match.group(1)) * _UNITS[unit])
            if size > 0:
                return size
        elif match and not unit:
            raise ValueError(
                f"{option}={value!r} has no unit; give {_ACCEPTED_SIZES} (an int counts bytes)"
            )
    raise ValueError(f"{option}={value!r} is not a size; give {_ACCEPTED_SIZES}")


def format_size(size: int) -> str:
    """``"300 MiB"``, ``"1.5 GiB"``: sizes as the messages show them.

    Example::

        >>> format_size(300 * 1024**2), format_size(3 * 1024**3 // 2)
        ('300 MiB', '1.5 GiB')
    """
    if size >= 1024**3:
        return f"{size / 1024**3:.3g} GiB"
    return f"{size / MIB:.0f} MiB" if size >= MIB else f"{size} bytes"


def _check_threads(value: object) -> ThreadsOption:
    if value is None or value == "auto":
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise ValueError(
        f"threads_per_worker={value!r} is not valid; give a positive int (threads for each "
        f"worker's BLAS/OpenMP pools), 'auto' (cores // workers, the default) or None "
        f"(leave the libraries alone)"
    )


def _check_env(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(
            f"env= must be a dict of environment variable names to string values, "
            f"got {type(value).__name__}"
        )
    checked: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise ValueError(
                f"env= key {key!r} is not an environment variable name (a non-empty str "
                f"without '=')"
            )
        if not isinstance(item, str) or "\0" in item:
            raise ValueError(
                f"env[{key!r}]={item!r} is not a str; environment values are strings "
                f"(write str({item!r}) if that is what you mean)"
            )
        checked[key] = item
    return checked


def _cores() -> int:
    from procession.backends.base import default_worker_count

    return default_worker_count()


def check_supported(name: str, factory: object, options: dict[str, Any]) -> dict[str, Any]:
    """Refuse resource options that backend ``name`` cannot honour; drop the unset ones.

    Called by :func:`procession.create_backend` before the backend is made, so a
    backend that never heard of these options refuses them up front, with the
    reason, instead of a bare ``TypeError`` (or, worse, ignoring them).
    """
    from procession.backends.base import Capabilities

    caps = getattr(factory, "capabilities", None)
    if not isinstance(caps, Capabilities):
        return options
    kept = dict(options)
    for option in RESOURCE_OPTIONS:
        if option not in kept or getattr(caps, option):
            continue
        value = kept.pop(option)
        unset = value is None or (option == "threads_per_worker" and value == "auto")
        unset = unset or (option == "env" and isinstance(value, Mapping) and not value)
        if unset:
            continue
        if not caps.isolated:
            why = "its tasks run inside this process"
            if option == "threads_per_worker":
                why += (
                    ", whose BLAS/OpenMP pools the caller shares: wrap your code in "
                    "threadpoolctl.threadpool_limits(N) instead"
                )
        else:
            why = f"it does not declare the {option!r} capability"
        raise ValueError(
            f"backend {name!r} cannot honour {option}={value!r}: {why}; use a process backend "
            f"('process', 'multiprocessing', 'loky' or 'dask'), which all accept it"
        )
    return kept


# -- the worker side ------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker applies to itself before it runs anything (small and picklable)."""

    env: tuple[tuple[str, str], ...] = ()
    threads: int | None = None


def apply_in_worker(settings: WorkerSettings | None) -> None:
    """Set the environment and cap the thread pools of this (worker) process."""
    if settings is None:
        return
    os.environ.update(dict(settings.env))
    if settings.threads is not None and _thread_pool_library_loaded():
        from threadpoolctl import threadpool_limits

        # Not used as a context manager: the caps stay for the worker's lifetime.
        threadpool_limits(limits=settings.threads)


# Shared-library names of the pools threadpoolctl controls (its own prefixes).
_POOL_LIBRARIES = (
    "openblas",
    "libblas",
    "mkl_rt",
    "libmkl",
    "blis",
    "libgomp",
    "libomp",
    "libiomp",
)


def _thread_pool_library_loaded() -> bool:
    """Whether a BLAS/OpenMP library is loaded already (the variables cover later ones).

    Importing threadpoolctl and scanning costs tens of milliseconds per worker
    start; on Linux, one read of ``/proc/self/maps`` says whether it is needed.
    """
    try:
        with open("/proc/self/maps", "rb") as maps:
            loaded = maps.read().lower()
    except OSError:
        return True  # cannot tell here: ask threadpoolctl
    return any(name.encode() in loaded for name in _POOL_LIBRARIES)


_applied: set[str] = set()
_applied_lock = threading.Lock()


def apply_once(token: str, settings: WorkerSettings | None) -> None:
    """:func:`apply_in_worker` once per process and ``token`` (for workers that are
    not ours to start, such as Dask's: applied before their first task of ours)."""
    if settings is None or token in _applied:
        return
    with _applied_lock:
        if token not in _applied:
            apply_in_worker(settings)
            _applied.add(token)


# -- the parent side ------------------------------------------------------------------


@dataclass
class ResourceControl:
    """A backend's validated resource options and its registration with the watcher.

    Example::

        control = ResourceControl.resolve(workers=4, memory_limit="300MiB")
        control.memory_limit, control.threads     # (314572800, cores // 4)
    """

    memory_limit: int | None = None
    threads: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    #: threads_per_worker was an explicit int (it then overrides the parent's variables).
    explicit_threads: bool = False
    #: pid -> rss at the moment the watcher stopped it for exceeding memory_limit.
    _over_limit: dict[int, int] = field(default_factory=dict, repr=False)
    #: pid -> (rss, monotonic time) of the last sample.
    _seen: dict[int, tuple[int, float]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def resolve(
        cls,
        *,
        workers: int,
        memory_limit: int | str | None = None,
        threads_per_worker: ThreadsOption = "auto",
        env: Mapping[str, str] | None = None,
        auto_threads: bool = True,
    ) -> ResourceControl:
        """Validate the three options (ValueError naming the accepted forms).

        ``auto_threads=False``: ``"auto"`` leaves the libraries alone (a cluster
        whose machines' cores this process cannot know).
        """
        limit = None if memory_limit is None else parse_size(memory_limit)
        threads = _check_threads(threads_per_worker)
        if threads == "auto":
            threads = max(1, _cores() // max(1, workers)) if auto_threads else None
        return cls(
            memory_limit=limit,
            threads=threads,
            env=_check_env(env),
            explicit_threads=isinstance(threads_per_worker, int),
        )

    def worker_settings(self) -> WorkerSettings | None:
        """What each worker applies to itself; None when there is nothing to do."""
        env: dict[str, str] = {}
        if self.threads is not None:
            for var in THREAD_ENV_VARS:
                # An explicit cap wins over the parent's environment; the automatic
                # one forwards a variable the parent has set (a forkserver's workers
                # would not otherwise see a value set after it started).
                parent = None if self.explicit_threads else os.environ.get(var)
                env[var] = str(self.threads) if parent is None else parent
        env.update(self.env)  # the user's own env= wins over everything
        if not env and self.threads is None:
            return None
        return WorkerSettings(env=tuple(env.items()), threads=self.threads)

    # -- watching ----------------------------------------------------------------

    def watch(self, backend: Backend) -> None:
        """Sample ``backend``'s workers (``worker_pids()``) while it is started."""
        _watcher().add(backend, self)

    def _sample(self, pid: int, rss: int, now: float) -> bool:
        """Record a sample; True when the worker must be stopped (over its limit)."""
        with self._lock:
            self._seen[pid] = (rss, now)
            if self.memory_limit is not None and rss > self.memory_limit:
                self._over_limit.setdefault(pid, rss)
                return True
        return False

    def _prune(self, live: set[int], now: float) -> None:
        with self._lock:
            for pid, (_, when) in list(self._seen.items()):
                if pid not in live and now - when > _SAMPLE_KEEP_SECONDS:
                    del self._seen[pid]
                    self._over_limit.pop(pid, None)

    def crash_error(
        self, message: str, *, pid: int | None, exitcode: int | None
    ) -> WorkerCrashedError:
        """The error for a task whose worker ``pid`` died: ``message`` describes the exit.

        A worker the watcher stopped for its memory becomes a WorkerMemoryError;
        one SIGKILLed by someone else after a high last sample is "probably out
        of memory"; anything else stays ``WorkerCrashedError(message)``.
        """
        with self._lock:
            over = self._over_limit.pop(pid, None) if pid is not None else None
            seen = self._seen.pop(pid, None) if pid is not None else None
        if over is not None and self.memory_limit is not None:
            return WorkerMemoryError(
                f"worker pid {pid} reached {format_size(over)}, over its "
                f"memory_limit={format_size(self.memory_limit)}, while running a task; it "
                f"was stopped and replaced (raise memory_limit= or make the task use less "
                f"memory)",
                exitcode=exitcode,
                limit=self.memory_limit,
                size=over,
            )
        if seen is not None and exitcode == -signal.SIGKILL and self._suspect(seen[0]):
            note = f"killed by SIGKILL, probably out of memory: last seen at {seen[0] // MIB} MiB"
            plain = f"killed by SIGKILL (exit code {exitcode})"
            if plain in message:
                message = message.replace(plain, f"{note} (exit code {exitcode})", 1)
            else:
                message = f"{message} ({note})"
        return WorkerCrashedError(message, exitcode=exitcode)

    def _suspect(self, rss: int) -> bool:
        if self.memory_limit is not None and rss >= OOM_SUSPECT_LIMIT_FRACTION * self.memory_limit:
            return True
        return rss >= OOM_SUSPECT_FRACTION * _memory_available_to_us()


def _memory_available_to_us() -> int:
    """Physical memory, or the cgroup's limit when it is lower (containers)."""
    import psutil

    total = int(psutil.virtual_memory().total)
    with contextlib.suppress(OSError, ValueError):
        with open("/sys/fs/cgroup/memory.max") as limit_file:
            text = limit_file.read().strip()
        if text != "max":
            total = min(total, int(text))
    return total


# -- the watcher thread ---------------------------------------------------------------


@dataclass(eq=False)
class _Watched:
    backend: weakref.ReferenceType[Backend]
    control: ResourceControl


class _Watcher:
    """One daemon thread per process samples the workers of every watched pool.

    It runs only while some pool is started, and forgets a pool once it stops.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: list[_Watched] = []
        self._thread: threading.Thread | None = None
        self._processes: dict[int, Any] = {}  # pid -> psutil.Process (keeps its identity)
        # pid -> (when listed, its child processes): listing children scans every
        # process of the machine, so it is done at most every CHILDREN_SECONDS.
        self._family: dict[int, tuple[float, list[Any]]] = {}

    def _children(self, pid: int, process: Any, now: float) -> list[Any]:
        listed = self._family.get(pid)
        if listed is None or now - listed[0] > CHILDREN_SECONDS:
            listed = self._family[pid] = (now, process.children(recursive=True))
        return listed[1]

    def add(self, backend: Backend, control: ResourceControl) -> None:
        with self._lock:
            if any(w.backend() is backend for w in self._watched):
                return
            self._watched.append(_Watched(weakref.ref(backend), control))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="procession-memory-watcher", daemon=True
                )
                self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._watched = [
                    w for w in self._watched if (b := w.backend()) is not None and b.started
                ]
                if not self._watched:
                    self._thread = None
                    self._processes.clear()
                    self._family.clear()
                    return
                watched = list(self._watched)
            limited = any(w.control.memory_limit is not None for w in watched)
            for w in watched:
                backend = w.backend()
                if backend is None:
                    continue
                try:
                    self._poll(backend, w.control)
                except Exception:  # one pool's trouble must not stop the others' watch
                    continue
                finally:
                    del backend  # hold no pool alive while sleeping
            time.sleep(POLL_SECONDS_LIMITED if limited else POLL_SECONDS_IDLE)

    def _poll(self, backend: Backend, control: ResourceControl) -> None:
        import psutil

        pids = backend.worker_pids()
        now = time.monotonic()
        for pid in pids:
            process = self._processes.get(pid)
            try:
                if process is None:
                    process = self._processes[pid] = psutil.Process(pid)
                family = [process]
                if control.memory_limit is not None:
                    family += self._children(pid, process, now)
                rss = 0
                for member in family:
                    with contextlib.suppress(psutil.Error):
                        rss += member.memory_info().rss
            except psutil.Error:
                self._processes.pop(pid, None)
                self._family.pop(pid, None)
                continue
            if control._sample(pid, rss, now):
                # Children first: they are part of the size, and would outlive it.
                for member in reversed(family):
                    with contextlib.suppress(psutil.Error):
                        member.kill()  # psutil checks the pid still names the same process
        for pid in [p for p in self._processes if p not in pids]:
            process = self._processes.get(pid)
            if process is not None and not _running(process):
                self._processes.pop(pid, None)
                self._family.pop(pid, None)
        control._prune(pids, now)


def _running(process: Any) -> bool:
    try:
        return bool(process.is_running())
    except Exception:
        return False


_the_watcher: _Watcher | None = None
_watcher_lock = threading.Lock()


def _watcher() -> _Watcher:
    global _the_watcher
    with _watcher_lock:
        if _the_watcher is None:
            _the_watcher = _Watcher()
        return _the_watcher


def _reset_after_fork() -> None:
    # The parent's watcher thread does not exist in a forked child, nor do its pools.
    global _the_watcher, _watcher_lock
    _the_watcher = None
    _watcher_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)
