"""The ``dask`` backend: the same map, Executor and Pipeline on a Dask cluster.

Three ways to get a cluster, chosen by the constructor:

- ``address="tcp://host:8786"``: connect to a running ``dask scheduler``;
- ``client=distributed.Client(...)``: reuse a client the caller already has;
- neither: start an embedded ``LocalCluster`` (one process per worker, one
  thread each, bound to 127.0.0.1, no dashboard unless asked), closed again by
  :meth:`DaskBackend.shutdown`.

Only what this backend started is ever stopped: a caller's client or a remote
cluster is left running.

    caller threads                 dask scheduler                  dask worker process
    ──────────────                 ──────────────                  ───────────────────
    submit(task bytes) ──client.submit(_run_on_worker)──►  assign ──► setup once (per process)
    TaskFuture                                                         "started" event ──┐
       ▲  mark_started ◄────────── event topic "procession-started-…" ◄──────────────────┘
       │                                                               run_task(bytes)
       └── set_result ◄── client event loop: one coroutine per task ◄── result bytes
           WorkerCrashedError ◄── KilledWorker / lost worker      (fetched concurrently)

Each task reports, before it runs the user's code, that it started and where
(worker address and pid), by a direct RPC to the scheduler so that the report
is out before a task that kills its worker at once can do so.  That makes
three things exact:

- ``timeout=``: measured from the real start; :meth:`kill_task` kills the
  process that runs the late task (through its nanny, which starts a fresh
  one), so ``TaskTimeoutError`` works as on the ``process`` backend;
- crash attribution: when a worker dies, Dask fails every task assigned to it,
  including ones still queued behind the one that crashed it, and ones that had
  finished but whose news (or result) was still on it.  Tasks that never
  reported a start, or that were followed by another start on that one-thread
  worker, cannot have caused the crash and are quietly resubmitted; only the
  task that was running becomes a ``WorkerCrashedError`` (which the scheduler's
  ``retries=`` can re-run);
- ``Pipeline``/``Executor`` cancellation: a started task is running, not
  cancellable, exactly like a ``concurrent.futures`` future.

The embedded cluster runs with ``distributed.scheduler.allowed-failures = 0``,
so Dask itself never re-runs a task whose worker died: procession's
``retries=`` decides.  A cluster reached through ``address=`` or ``client=``
keeps its own setting (Dask's default re-runs such a task up to 3 times before
giving up), which procession cannot change from the outside.

Task bytes are opaque here, as everywhere: the worker side is
:func:`procession.worker.run_task`, so recipes are rebuilt and cached once per
Dask worker process by the worker runtime, like on every other backend.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import itertools
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import traceback
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from procession import worker as runtime
from procession.backends._resources import (
    ResourceControl,
    ThreadsOption,
    WorkerSettings,
    apply_once,
)
from procession.backends._worker_process import describe_exit
from procession.backends.base import Backend, Capabilities, StoredBuffer, TaskFuture
from procession.errors import BackendUnavailableError, WorkerCrashedError

if TYPE_CHECKING:
    from distributed import Client, LocalCluster

# Dask's futures and clients are only partly typed; they are handled as Any here.
DaskFuture = Any

__all__ = ["DaskBackend"]

INSTALL_HINT = "pip install 'procession[dask]'"
TOPIC_PREFIX = "procession-started-"
# A task that died with its worker but cannot have caused it (it never started,
# or it had finished) is resubmitted at most this many times: a worker that dies
# before a task can report anything must not make a poisonous task loop forever.
MAX_INNOCENT_RESUBMITS = 3
CLOSE_TIMEOUT_SECONDS = 5.0
KILL_CLOSE_TIMEOUT_SECONDS = 2.0
EXITCODE_WAIT_SECONDS = 0.5


# -- the worker side (runs in dask worker processes) -------------------------------


class WorkerSetupError(Exception):
    """Raised in a Dask worker whose ``worker_setup`` (Executor initializer) failed.

    Carries the failure as text so it travels whatever the exception was; the
    client turns it into ``WorkerCrashedError`` with the worker's traceback.
    """

    def __init__(self, type_name: str, message: str, traceback_text: str) -> None:
        super().__init__(type_name, message, traceback_text)
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text


_setup_lock = threading.Lock()
_setup_done: dict[str, WorkerSetupError | None] = {}


def _setup_once(token: str, setup: bytes) -> None:
    """Run the backend's worker_setup once in this process; replay its failure after."""
    with _setup_lock:
        if token not in _setup_done:
            try:
                runtime.initialize_worker(setup)
            except BaseException as exc:
                _setup_done[token] = WorkerSetupError(
                    f"{type(exc).__module__}.{type(exc).__qualname__}",
                    str(exc),
                    "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                )
            else:
                _setup_done[token] = None
        failure = _setup_done[token]
    if failure is not None:
        raise failure


def _report_start(topic: str, tag: int) -> None:
    """Tell the client that task ``tag`` starts now, and in which process.

    A direct RPC to the scheduler (not the worker's batched stream), so the
    event is on the scheduler before the user's code runs: a task that kills
    its worker at once is still known to have started.
    """
    try:
        from distributed import get_worker
        from distributed.utils import sync
    except ImportError:  # pragma: no cover - dask workers always have distributed
        return
    try:
        dask_worker = get_worker()
    except ValueError:
        return  # not inside a dask worker (e.g. a test calling this directly)
    sync(
        dask_worker.loop,
        dask_worker.scheduler.log_event,
        topic=topic,
        msg=[tag, dask_worker.address, os.getpid()],
    )


def _run_on_worker(
    task: bytes,
    token: str,
    tag: int,
    setup: bytes | None,
    resources: WorkerSettings | None = None,
    keys: tuple[str, ...] = (),
    *buffers: Any,
) -> bytes:
    """The function every Dask task runs: setup once, report the start, run the task.

    ``buffers``: the scattered large arguments the task names (Dask resolved
    their futures to their bytes on this worker before calling), by ``keys``.
    """
    apply_once(token, resources)  # env= and thread caps, once per worker process
    if setup is not None:
        _setup_once(token, setup)
    _report_start(TOPIC_PREFIX + token, tag)
    return runtime.run_task(task, dict(zip(keys, buffers, strict=True)) if keys else None)


def _kill_pid(pid: int) -> bool:
    """Run in a nanny: SIGKILL its worker process (the nanny then starts a fresh one)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


# -- the client side ------------------------------------------------------------------


@dataclass
class _Attempt:
    """One Dask task standing for one TaskFuture (a resubmission is a new attempt)."""

    future: TaskFuture
    tag: int
    task: bytes
    buffers: tuple[StoredBuffer, ...] = ()
    resubmits: int = 0
    started: bool = False
    address: str | None = None
    pid: int | None = None
    start_seq: int = -1
    dask_future: Any = None


# Options of procession's process pools that have no Dask equivalent.
_PROCESS_POOL_OPTIONS = frozenset({"start_method", "max_tasks_per_worker"})
PROCESS_CAPABILITIES = Capabilities(
    isolated=True,
    kill=True,
    crash_detection=True,
    remote=True,
    buffer_store=True,  # large arguments are scattered once per map
    memory_limit=True,  # embedded cluster only: refused with address=/client=
    threads_per_worker=True,
    env=True,
)
# Workers that are threads of the caller's own process (``LocalCluster(processes=False)``):
# nothing can be killed, and a crash would be the caller's.
IN_PROCESS_CAPABILITIES = Capabilities(
    isolated=False, kill=False, crash_detection=False, remote=True, buffer_store=True
)


class _CapabilitiesDescriptor:
    """``DaskBackend.capabilities``: the class promises what the embedded cluster does;
    an instance on an existing cluster answers for that cluster (connecting if needed).

    A task is killed by killing its worker process: through the nanny, which starts
    a fresh one (embedded cluster, and ``dask worker``'s default), or, without a
    nanny, by making that worker exit.  Only workers running as threads of this very
    process cannot be killed, so a cluster with such workers declares no ``kill``
    and ``timeout=`` is refused up front.
    """

    def __get__(self, instance: DaskBackend | None, owner: type) -> Capabilities:
        if instance is None or instance.embedded:
            return PROCESS_CAPABILITIES
        return instance._cluster_capabilities()


class DaskBackend(Backend):
    """Runs tasks on a Dask distributed cluster (embedded ``LocalCluster`` by default).

    Example::

        backend = procession.create_backend("dask", address="tcp://10.0.0.5:8786")
        for y in procession.map(f, items, backend=backend):
            ...
        backend.shutdown()   # closes this backend's client; the cluster keeps running

    ``workers``: embedded cluster: how many worker processes to start;
    ``address=``/``client=``: how many tasks to keep in flight (default: the
    cluster's thread count when first used).  ``dashboard=True`` (or an
    address such as ``"127.0.0.1:8787"``) serves the embedded cluster's
    dashboard; see :attr:`dashboard_link`.  Further keywords go to
    ``distributed.LocalCluster``.
    """

    name: ClassVar[str] = "dask"
    # On the class (what available_backends() reports): the embedded cluster's.
    # On an instance: what its cluster can really do (see _Capabilities).
    capabilities = _CapabilitiesDescriptor()
    default_serializer: ClassVar[str] = "cloudpickle"

    def __init__(
        self,
        workers: int | None = None,
        worker_setup: bytes | None = None,
        *,
        address: str | None = None,
        client: Client | None = None,
        dashboard: bool | str = False,
        memory_limit: int | str | None = None,
        threads_per_worker: ThreadsOption = "auto",
        env: dict[str, str] | None = None,
        **cluster_options: Any,
    ) -> None:
        super().__init__(workers=workers, worker_setup=worker_setup)
        # Resource options (docs/resources.md); "auto" thread caps only where we know
        # the cores (embedded cluster); memory_limit only on workers we start.
        self.resources = ResourceControl.resolve(
            workers=self._workers,
            memory_limit=memory_limit,
            threads_per_worker=threads_per_worker,
            env=env,
            auto_threads=address is None and client is None,
        )
        self._worker_settings = self.resources.worker_settings()
        if memory_limit is not None and (address is not None or client is not None):
            raise ValueError(
                f"memory_limit={memory_limit!r} applies to the workers of the embedded "
                f"LocalCluster only; an existing cluster (address=/client=) sets its own "
                f"workers' limit: start them with `dask worker --memory-limit SIZE`, or drop "
                f"address=/client= to let procession start a LocalCluster"
            )
        unsupported = sorted(set(cluster_options) & _PROCESS_POOL_OPTIONS)
        if unsupported:
            # TypeError: Executor turns it into "backend 'dask' does not accept these options".
            raise TypeError(
                f"the dask backend does not support {', '.join(unsupported)}: Dask starts "
                f"its worker processes itself (with the 'spawn' method) and never recycles "
                f"them after a number of tasks"
            )
        if address is not None and client is not None:
            raise ValueError("give address= or client=, not both")
        if address is not None and not isinstance(address, str):
            raise TypeError(f"address must be a scheduler address string, got {address!r}")
        if (address is not None or client is not None) and cluster_options:
            raise ValueError(
                f"{', '.join(sorted(cluster_options))} configure an embedded LocalCluster; "
                f"they cannot apply to an existing cluster given by address= or client="
            )
        self._explicit_workers = workers is not None
        self._address = address
        self._given_client = client
        self._dashboard = dashboard
        self._cluster_options = cluster_options
        self._token = uuid.uuid4().hex
        self._topic = TOPIC_PREFIX + self._token
        self._lock = threading.RLock()
        self._client: Any = None
        self._cluster: Any = None
        self._closed = False
        self._tags = itertools.count()
        # Start order, and the last task started on each worker: on a one-thread
        # worker that died, only the last task it started can have killed it.
        self._start_seqs = itertools.count()
        self._last_start: dict[str, int] = {}
        self._one_thread_workers = False
        self._attempts: dict[int, _Attempt] = {}  # tag -> attempt in flight
        self._by_future: dict[TaskFuture, _Attempt] = {}
        # Embedded cluster: worker pid -> its process handle (for exit codes after a crash).
        self._processes: dict[int, Any] = {}
        self._exit_hook: Callable[[], None] | None = None
        # Embedded clusters being closed (a later kill must still reach them).
        self._closing: list[Any] = []
        self._scratch: str | None = None  # the embedded cluster's local_directory
        # Bounded prefetch: futures handed to Dask, and attempts waiting for a slot.
        self._prefetch: int | None = None
        self._draining: Any = None  # the client while shutdown(wait=True) drains
        self._sent: set[Future[bytes]] = set()
        self._waiting: deque[_Attempt] = deque()

    # -- options -----------------------------------------------------------------

    @property
    def workers(self) -> int:
        """Worker processes (embedded) or tasks kept in flight (existing cluster)."""
        if not self._explicit_workers and self.embedded is False:
            self.start()
            with self._lock:
                client = self._client
            if client is not None:
                with contextlib.suppress(Exception):
                    threads = sum(client.nthreads().values())
                    return max(1, int(threads))
        return self._workers

    @workers.setter
    def workers(self, value: int) -> None:
        self._workers = value

    def _cluster_capabilities(self) -> Capabilities:
        self.start()
        with self._lock:
            client = self._client
        if client is None:
            return PROCESS_CAPABILITIES
        return IN_PROCESS_CAPABILITIES if _has_in_process_workers(client) else PROCESS_CAPABILITIES

    @property
    def embedded(self) -> bool:
        """True when this backend starts (and stops) its own LocalCluster."""
        return self._address is None and self._given_client is None

    @property
    def client(self) -> Client | None:
        """The ``distributed.Client`` in use (None before start and after shutdown)."""
        client: Client | None = self._client
        return client

    @property
    def dashboard_link(self) -> str | None:
        """The embedded cluster's dashboard URL, when ``dashboard=`` asked for one."""
        cluster = self._cluster
        if cluster is None or not self._dashboard:
            return None
        return str(cluster.dashboard_link)

    @classmethod
    def check_available(cls) -> None:
        try:
            spec = importlib.util.find_spec("distributed")
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            raise BackendUnavailableError(
                f"the 'dask' backend needs the 'distributed' package, which is not "
                f"installed; fix: {INSTALL_HINT}"
            )

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._client is not None:
                return
            self.check_available()
            self._closed = False
            import distributed

            from procession.pools import drain_first_at_exit

            # After distributed's own exit hooks (its thread pools), so it runs before them.
            drain_first_at_exit("dask")

            client_class: Any = distributed.Client
            client: Any
            if self._given_client is not None:
                client = self._given_client
            elif self._address is not None:
                # set_as_default=False: never hijack the caller's own dask default client.
                client = client_class(self._address, set_as_default=False)
            else:
                self._cluster = self._start_cluster()
                try:
                    client = client_class(self._cluster, set_as_default=False)
                except BaseException:
                    self._cluster.close()
                    self._cluster = None
                    raise
                # Registered after distributed's own exit hooks, so it runs before
                # them: the cluster is stopped at once, not closed politely.
                self._exit_hook = functools.partial(_shutdown_at_exit, weakref.ref(self))
                atexit.register(self._exit_hook)
            client.subscribe_topic(self._topic, self._on_started)
            self._client = client
            if self._cluster is not None:
                self.resources.watch(self)  # memory_limit=, and what a SIGKILL was about

    def _start_cluster(self) -> Any:
        import dask
        import distributed

        cluster_class: Any = distributed.LocalCluster

        dashboard = self._dashboard
        if dashboard is True:
            dashboard_address: str | None = "127.0.0.1:0"
        elif isinstance(dashboard, str):
            dashboard_address = dashboard
        else:
            dashboard_address = None
        options: dict[str, Any] = {
            "n_workers": self._workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": dashboard_address,
            # The scheduler always serves HTTP (health, metrics), on :8787 unless
            # told otherwise, which another cluster may hold: ask for a free port.
            "scheduler_kwargs": {
                "dashboard": dashboard_address is not None,
                "dashboard_address": dashboard_address or "127.0.0.1:0",
            },
            # procession reports crashes itself (WorkerCrashedError); Dask's own
            # log lines about dead workers would only repeat them on stderr.
            "silence_logs": logging.CRITICAL,
            # Import procession while a worker starts, not during its first task
            # (whose time counts against timeout=).
            "preload": [__name__],
        }
        options.update(self._cluster_options)
        if "local_directory" not in self._cluster_options:
            # Our own scratch folder, removed at shutdown: Dask's default
            # ($TMPDIR/dask-scratch-space) keeps the workers' lock files after a run.
            self._scratch = tempfile.mkdtemp(prefix="procession-dask-")
            options["local_directory"] = self._scratch
        self._one_thread_workers = options["threads_per_worker"] == 1
        config: dict[str, Any] = {"distributed.scheduler.allowed-failures": 0}
        if self.resources.memory_limit is not None:
            # Dask's workers know their budget; procession's watcher enforces it (a
            # Dask pause could leave a task waiting forever, its own terminate would
            # make a plain crash of what is a WorkerMemoryError).
            options["memory_limit"] = self.resources.memory_limit
            config["distributed.worker.memory.pause"] = False
            config["distributed.worker.memory.terminate"] = False
        # allowed-failures=0: a task whose worker died fails at once, so that
        # procession's retries= (not Dask) decides whether it runs again.
        with dask.config.set(config):
            cluster = cluster_class(**options)
        _keep_nannies(cluster)
        return cluster

    @property
    def started(self) -> bool:
        return self._client is not None

    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        """Stop using the cluster; close what this backend started.

        ``wait``: let submitted tasks finish first (``wait=False`` does that in the
        background and returns at once).  ``kill``: stop the embedded cluster's
        worker processes now, even mid-task, and fail unfinished futures.  A
        cluster reached through ``address=``/``client=`` is never stopped: its
        unfinished tasks are cancelled (one already running on a worker runs on).
        """
        with self._lock:
            client, self._client = self._client, None
            self._draining = None if kill else client
            cluster, self._cluster = self._cluster, None
            self._closed = True
            exit_hook, self._exit_hook = self._exit_hook, None
            if cluster is not None:
                self._closing.append(cluster)
            closing = list(self._closing) if kill else []
        if exit_hook is not None:
            atexit.unregister(exit_hook)
        if kill or wait:
            self._processes.clear()
        if kill:
            for old in closing:
                _stop_cluster_now(old)
            if client is not None:
                self._close(client, cluster, wait=False)
            self._remove_scratch()
            return
        if client is None:
            return
        if wait:
            self._close(client, cluster, wait=True)
        else:
            threading.Thread(
                target=self._close,
                args=(client, cluster),
                kwargs={"wait": True},
                name="procession-dask-shutdown",
                daemon=True,
            ).start()

    def _close(self, client: Any, cluster: Any, *, wait: bool) -> None:
        if wait:
            with self._lock:
                pending = [a.future for a in self._by_future.values()]
            wait_futures(pending)
        with self._lock:
            self._draining = None
        with self._lock:
            attempts = list(self._attempts.values())
            attempts += [a for a in self._waiting if self._by_future.get(a.future) is a]
            self._waiting.clear()
            self._attempts.clear()
            self._by_future.clear()
        for attempt in attempts:
            attempt.future.settle(
                exc=WorkerCrashedError("the dask backend was shut down before this task finished")
            )
        dask_futures = [a.dask_future for a in attempts if a.dask_future is not None]
        with contextlib.suppress(Exception):
            client.unsubscribe_topic(self._topic)
        if dask_futures:
            with contextlib.suppress(Exception):
                client.cancel(dask_futures)
        if client is not self._given_client:
            with contextlib.suppress(Exception):
                client.close(timeout=CLOSE_TIMEOUT_SECONDS)
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close(timeout=CLOSE_TIMEOUT_SECONDS)
            # A task that hung through the close must not keep its process alive.
            _stop_cluster_now(cluster)
            with self._lock:
                if cluster in self._closing:
                    self._closing.remove(cluster)
            self._remove_scratch()

    def _remove_scratch(self) -> None:
        with self._lock:
            scratch, self._scratch = self._scratch, None
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    def worker_pids(self) -> set[int]:
        """Pids of the embedded cluster's worker processes (empty for an existing cluster:
        its workers are not this process's to count, and may be on other machines)."""
        cluster = self._cluster
        if cluster is None:
            return set()
        return _cluster_pids(cluster)

    # -- tasks --------------------------------------------------------------------

    def submit(self, task: bytes) -> TaskFuture:
        return self.submit_with_buffers(task, [])

    def store_buffer(self, data: bytes) -> StoredBuffer:
        """Scatter ``data`` to the cluster once; tasks that name it depend on it."""
        self.start()
        with self._lock:
            client = self._client
        if client is None:
            raise RuntimeError("cannot store a buffer on a dask backend that was shut down")
        key = f"procession-buffer-{uuid.uuid4().hex}"
        # hash=False and our own key: equal buffers of two maps are two objects,
        # each released with its own map.
        (dask_future,) = client.scatter({key: data}, hash=False).values()
        return StoredBuffer(key=key, nbytes=len(data), data=data, ref=dask_future)

    def drop_buffers(self, buffers: list[StoredBuffer]) -> None:
        for stored in buffers:
            # Dask forgets a scattered key once no client future refers to it; a
            # task already sent holds its own reference until it finishes.
            dask_future, stored.ref = stored.ref, None
            if dask_future is not None:
                with contextlib.suppress(Exception):
                    dask_future.release()

    def submit_with_buffers(self, task: bytes, buffers: list[StoredBuffer]) -> TaskFuture:
        self.start()
        if self._prefetch is None:
            # Read here, in the caller's thread: for an existing cluster it asks
            # the scheduler, which must never happen from the client's event loop.
            self._prefetch = 2 * max(1, self.workers)
        future = TaskFuture()
        attempt = _Attempt(future=future, tag=next(self._tags), task=task, buffers=tuple(buffers))
        with self._lock:
            if self._closed or self._client is None:
                raise RuntimeError("cannot submit to a dask backend that was shut down")
            self._by_future[future] = attempt
            # A small bounded prefetch: a task goes to Dask only when a worker will
            # soon take it, so the rest stays here, cancellable, in order.
            send = len(self._sent) < self._prefetch
            if send:
                self._sent.add(future)
            else:
                self._waiting.append(attempt)
        future.add_done_callback(self._on_task_future_done)
        if send:
            self._send(attempt)
        return future

    def _release(self, future: Future[bytes]) -> None:
        """``future`` is done: its slot goes to the next waiting task, if any."""
        ready: list[_Attempt] = []
        with self._lock:
            if future not in self._sent:
                return
            self._sent.discard(future)
            while self._waiting and len(self._sent) < (self._prefetch or 1):
                attempt = self._waiting.popleft()
                if attempt.future.done() or self._by_future.get(attempt.future) is not attempt:
                    continue  # cancelled while waiting
                self._sent.add(attempt.future)
                ready.append(attempt)
        for attempt in ready:
            self._send(attempt)

    def _send(self, attempt: _Attempt) -> None:
        with self._lock:
            # While shutdown(wait=True) drains, tasks still waiting for a slot go out.
            client = self._client or self._draining
            if client is None:
                return
            self._attempts[attempt.tag] = attempt
        try:
            dependencies = [self._scattered(client, stored) for stored in attempt.buffers]
            dask_future = client.submit(
                _run_on_worker,
                attempt.task,
                self._token,
                attempt.tag,
                self.worker_setup,
                self._worker_settings,
                tuple(stored.key for stored in attempt.buffers),
                *dependencies,
                key=f"procession-{self._token[:8]}-{attempt.tag}",
                pure=False,
            )
        except BaseException as exc:
            with self._lock:
                self._attempts.pop(attempt.tag, None)
                self._by_future.pop(attempt.future, None)
            attempt.future.settle(exc=exc)
            return
        attempt.dask_future = dask_future
        if attempt.future.cancelled():
            # Cancelled while it was being submitted: _on_task_future_done missed it.
            _cancel(dask_future)
            return
        client.loop.add_callback(self._watch, client, attempt, dask_future)

    @staticmethod
    def _scattered(client: Any, stored: StoredBuffer) -> DaskFuture:
        """The future of a stored buffer, scattered again if the workers holding it
        were lost (scattered data has no recipe: Dask cannot recompute it)."""
        dask_future = stored.ref
        if dask_future is None or dask_future.status in ("lost", "error", "cancelled"):
            (dask_future,) = client.scatter({stored.key: stored.data}, hash=False).values()
            stored.ref = dask_future
        return dask_future

    def _on_started(self, event: tuple[float, Any]) -> None:
        """Runs in the client's event loop for every "started" event."""
        _timestamp, msg = event
        try:
            tag, address, pid = msg
        except (TypeError, ValueError):
            return
        with self._lock:
            attempt = self._attempts.get(tag)
        if attempt is None:
            return
        attempt.started = True
        attempt.address = address
        attempt.pid = pid
        attempt.start_seq = next(self._start_seqs)
        self._last_start[address] = attempt.start_seq
        cluster = self._cluster
        if cluster is not None and pid not in self._processes:
            process = _cluster_processes(cluster).get(pid)
            if process is not None:
                if len(self._processes) > 2 * self._workers:
                    # A handle keeps the dead process's pipes open: keep only the
                    # live ones and those whose crash may still be being reported.
                    for old, handle in list(self._processes.items()):
                        if getattr(handle, "exitcode", None) is not None:
                            self._processes.pop(old, None)
                self._processes[pid] = process
        future = attempt.future
        # A started task is running: cancel() now fails, as with concurrent.futures.
        # (A resubmitted task's future is running already.)
        if future.running() or future.set_running_or_notify_cancel():
            future.mark_started((address, pid))

    async def _watch(self, client: Any, attempt: _Attempt, dask_future: DaskFuture) -> None:
        """Runs in the client's event loop: wait for one Dask task and fetch its result.

        Fetching here, concurrently, rather than in Dask's single callback thread
        means one slow fetch (say, from a worker that is dying) never holds up
        the other results, whose lateness would look like timeouts.
        """
        try:
            data = await client.gather(dask_future, asynchronous=True)
        except BaseException as exc:  # incl. asyncio.CancelledError: the task is gone
            self._on_failed(attempt, exc)
        else:
            with self._lock:
                if self._attempts.get(attempt.tag) is not attempt:
                    return  # killed, cancelled or shut down: already settled
                del self._attempts[attempt.tag]
            self._settle(attempt, value=data)

    def _on_failed(self, attempt: _Attempt, error: BaseException) -> None:
        with self._lock:
            if self._attempts.get(attempt.tag) is not attempt:
                return  # killed, cancelled or shut down: already settled
            del self._attempts[attempt.tag]
        if isinstance(error, WorkerSetupError):
            crash = WorkerCrashedError.initializer_failed(
                error.type_name, error.message, error.traceback_text
            )
            self._settle(attempt, exc=crash)
            return
        if not _is_worker_loss(error):
            # The worker could not run procession's runtime at all (not installed there?).
            self._settle(attempt, exc=error)
            return
        # The worker died (KilledWorker) or the task vanished (scheduler lost, ...).
        dead = _dead_worker(error)
        self._forget_starts_on(dead, attempt)
        # A task queued behind the one that crashed the worker never started: innocent.
        if not attempt.started and self._resubmit(attempt):
            return
        if (
            self._one_thread_workers
            and dead is not None
            and attempt.address == dead
            and self._last_start.get(dead, attempt.start_seq) > attempt.start_seq
            and self._resubmit(attempt)
        ):
            # It had finished (its worker went on to start another task), but the
            # news had not left the worker when it died: innocent too.
            return
        # Reading the exit code may take a moment: never in the event loop.
        threading.Thread(
            target=lambda: self._settle(attempt, exc=self._crash_error(attempt, error)),
            name="procession-dask-crash",
            daemon=True,
        ).start()

    def _forget_starts_on(self, address: str | None, culprit: _Attempt) -> None:
        """Tasks that started on a one-thread worker that just died, before the last
        task it started, had finished: Dask computes their lost results again.
        Until those re-runs start, waiting for them is not the tasks' time."""
        if address is None or not self._one_thread_workers:
            return
        last = self._last_start.get(address)
        with self._lock:
            others = [
                a
                for a in self._attempts.values()
                if a is not culprit
                and a.started
                and a.address == address
                and last is not None
                and a.start_seq < last  # not the one it was running when it died
            ]
        for other in others:
            other.started = False
            other.future.started_at = None

    def _resubmit(self, attempt: _Attempt) -> bool:
        """Run an innocent victim of a worker's death again (a bounded number of times)."""
        if self._closed or attempt.resubmits >= MAX_INNOCENT_RESUBMITS:
            return False
        retry = _Attempt(
            future=attempt.future,
            tag=next(self._tags),
            task=attempt.task,
            buffers=attempt.buffers,
            resubmits=attempt.resubmits + 1,
        )
        with self._lock:
            if self._by_future.get(attempt.future) is not attempt:
                return True  # cancelled or killed meanwhile: nothing to run
            self._by_future[attempt.future] = retry
        # Queued again, not running: time waiting for a worker is not the task's.
        attempt.future.started_at = None
        self._send(retry)
        return True

    def _crash_error(self, attempt: _Attempt, error: BaseException) -> WorkerCrashedError:
        where = f"worker at {attempt.address}" if attempt.started else "worker"
        detail = f"dask reported {type(error).__name__}: {error}"
        if not attempt.started:
            detail += (
                f" (the task was resubmitted {attempt.resubmits} times without "
                f"reporting a start: its workers died before it could run)"
            )
        exitcode = self._exitcode(attempt.pid) if attempt.started else None
        if attempt.started:
            where = f"{describe_exit(attempt.pid, exitcode)} ({where})"
        # WorkerMemoryError when the memory watcher stopped it.
        crash = self.resources.crash_error(
            f"dask {where} while running a task; {detail}", pid=attempt.pid, exitcode=exitcode
        )
        crash.__cause__ = error
        return crash

    def _exitcode(self, pid: int | None) -> int | None:
        """The exit code of one of our LocalCluster's worker processes, once it is known."""
        process = self._processes.get(pid) if pid is not None else None
        if process is None:
            return None
        # Dask notices the closed connection about when the watcher thread reaps
        # the process; give the exit code a moment to arrive.
        deadline = time.monotonic() + EXITCODE_WAIT_SECONDS
        while True:
            exitcode = getattr(process, "exitcode", None)
            if exitcode is not None or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        with self._lock:
            self._processes.pop(pid, None)  # type: ignore[arg-type]
        return exitcode if isinstance(exitcode, int) else None

    def _settle(
        self, attempt: _Attempt, *, value: bytes | None = None, exc: BaseException | None = None
    ) -> None:
        with self._lock:
            if self._by_future.get(attempt.future) is attempt:
                del self._by_future[attempt.future]
        attempt.future.settle(value, exc=exc)

    def _on_task_future_done(self, future: Future[bytes]) -> None:
        """A task finished (or was cancelled before it started: drop its Dask task)."""
        self._release(future)
        if not future.cancelled():
            return
        with self._lock:
            attempt = self._by_future.pop(future, None)  # type: ignore[call-overload]
            if attempt is None:
                return
            self._attempts.pop(attempt.tag, None)
            client = self._client
        if client is not None and attempt.dask_future is not None:
            _cancel(attempt.dask_future)

    def kill_task(self, future: TaskFuture) -> None:
        """Stop the task behind ``future``: kill its worker process (the nanny replaces
        it) and fail the future with WorkerCrashedError."""
        with self._lock:
            attempt = self._by_future.get(future)
            dask_future = attempt.dask_future if attempt is not None else None
            status = dask_future.status if dask_future is not None else None
            if status == "finished":
                return  # it finished in time; its result is being fetched
            if status == "lost":
                # It finished, but the worker holding its result died and Dask is
                # computing it again: waiting for that is not the task being late.
                future.started_at = None
                return
            if attempt is not None:
                del self._by_future[future]
                self._attempts.pop(attempt.tag, None)
            client = self._client
            cluster = self._cluster
        if attempt is None or client is None:
            return
        if attempt.dask_future is not None:
            _cancel(attempt.dask_future)
        how = "cancelled before it started"
        if attempt.started and attempt.pid is not None:
            how = f"stopped by killing its worker pid {attempt.pid} at {attempt.address}"
            if cluster is not None:
                # Our own LocalCluster: its workers are our children.  A pid that
                # is no longer among them already died (and was replaced).
                if attempt.pid in _cluster_pids(cluster):
                    _kill_pid(attempt.pid)
            else:
                # Reaching another machine's nanny can take a while (or time out
                # if the worker is gone): never hold up the caller for it.
                threading.Thread(
                    target=self._kill_remote,
                    args=(client, attempt.address, attempt.pid),
                    name="procession-dask-kill",
                    daemon=True,
                ).start()
        future.settle(exc=WorkerCrashedError(f"the task was {how}"))

    @staticmethod
    def _kill_remote(client: Any, address: str, pid: int) -> None:
        """Kill the process behind a late task on another machine, through its nanny."""
        if pid == os.getpid() or _has_in_process_workers(client):
            return  # never kill the caller; such clusters declare no kill capability
        try:
            client.run(_kill_pid, pid, workers=[address], nanny=True)
        except Exception:
            # No nanny (``dask worker --no-nanny``): the worker exits by itself.
            with contextlib.suppress(Exception):
                client.run(os._exit, 1, workers=[address], wait=False)

    def __repr__(self) -> str:
        if self._address is not None:
            where = f"address={self._address!r}"
        elif self._given_client is not None:
            where = "client=<given>"
        else:
            where = f"LocalCluster workers={self._workers}"
        return f"<{type(self).__name__} {self.name!r} {where}>"


def _cluster_processes(cluster: LocalCluster) -> dict[int, Any]:
    """pid -> process handle of each live worker process of a LocalCluster.

    Read from the nannies' process objects without polling them (polling would
    reap a dead worker before Dask's own watcher can read its exit code).
    """
    found: dict[int, Any] = {}
    for nanny in list(getattr(cluster, "workers", {}).values()):
        process = getattr(getattr(nanny, "process", None), "process", None)
        pid = getattr(process, "pid", None)
        if isinstance(pid, int) and getattr(process, "exitcode", None) is None:
            found[pid] = process
    return found


def _keep_nannies(cluster: Any) -> None:
    """Stop a LocalCluster from giving up on a worker that is slow to come back.

    When a worker leaves the scheduler, ``SpecCluster`` closes its nanny for good
    unless a worker of the same name is back ``lost-worker-timeout`` (15 s) later.
    A worker that crashes twice in a row can be mid-restart at that moment: its
    nanny would be closed, the cluster would shrink for good, and the task the
    fresh worker had just started would fail as if it had crashed.  Our nannies
    always restart their workers, so only the bookkeeping part is kept.
    """
    try:
        from distributed.deploy.cluster import Cluster
    except ImportError:  # pragma: no cover
        return
    if not hasattr(cluster, "_update_worker_status"):
        return

    bookkeeping: Any = Cluster._update_worker_status

    def update_worker_status(op: str, msg: Any) -> None:
        bookkeeping(cluster, op, msg)

    cluster._update_worker_status = update_worker_status


def _shutdown_at_exit(ref: weakref.ReferenceType[DaskBackend]) -> None:
    from procession.pools import drain_accepted_work

    # Work an Executor accepted runs to completion first (concurrent.futures semantics).
    drain_accepted_work()
    backend = ref()
    if backend is not None:
        backend.shutdown(wait=False, kill=True)


def _stop_cluster_now(cluster: Any) -> None:
    """Stop a LocalCluster's worker processes at once, even mid-task.

    The nannies are told to close first, so none starts a replacement for the
    worker it is about to lose; then the workers get SIGKILL.
    """
    import asyncio

    nannies = list(getattr(cluster, "workers", {}).values())
    pids = _cluster_pids(cluster)

    async def stop() -> None:
        closes = [
            asyncio.ensure_future(nanny.close(timeout=0.5, reason="procession-kill"))
            for nanny in nannies
            if hasattr(nanny, "close")
        ]
        await asyncio.sleep(0)  # each close() has marked its nanny as closing
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if closes:
            await asyncio.wait(closes, timeout=KILL_CLOSE_TIMEOUT_SECONDS)

    try:
        if getattr(cluster, "status", None) is not None and nannies:
            cluster.sync(stop, callback_timeout=KILL_CLOSE_TIMEOUT_SECONDS + 1)
    except Exception:
        pass  # the loop is gone (closed cluster, interpreter exit): kill directly
    for pid in pids | _cluster_pids(cluster):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _cluster_pids(cluster: LocalCluster) -> set[int]:
    return set(_cluster_processes(cluster))


def _has_in_process_workers(client: Any) -> bool:
    """Does any worker of ``client``'s cluster run as a thread of this process?"""
    try:
        import distributed

        workers = client.nthreads()  # address -> threads, for every worker
        local = {w.address for w in list(getattr(distributed.Worker, "_instances", ()))}
    except Exception:
        return False
    return any(address.startswith("inproc://") or address in local for address in workers)


def _dead_worker(exc: BaseException) -> str | None:
    """The address of the worker a KilledWorker names, if any."""
    last = getattr(exc, "last_worker", None)
    address = getattr(last, "address", None)
    return address if isinstance(address, str) else None


def _is_worker_loss(exc: BaseException) -> bool:
    """A dead worker (KilledWorker) or a task that vanished (cancelled by Dask)."""
    import asyncio
    from concurrent.futures import CancelledError

    try:
        from distributed.scheduler import KilledWorker
    except ImportError:  # pragma: no cover
        return isinstance(exc, CancelledError | asyncio.CancelledError)
    return isinstance(exc, KilledWorker | CancelledError | asyncio.CancelledError)


_pending_cancels: set[Any] = set()


def _cancel(dask_future: Any) -> None:
    """Cancel a Dask task from any thread, the client's event loop included (where
    the client's blocking methods must not be called)."""
    import asyncio

    try:
        client = dask_future.client
        try:
            running: Any = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None and running is getattr(client.loop, "asyncio_loop", None):
            task = asyncio.ensure_future(client.cancel([dask_future], asynchronous=True))
            _pending_cancels.add(task)  # keep it alive until done
            task.add_done_callback(_pending_cancels.discard)
        else:
            dask_future.cancel()
    except Exception:
        pass  # the client is closing: the task goes with it
