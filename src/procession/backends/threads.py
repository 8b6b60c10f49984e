"""The ``threads`` backend: a pool of threads in the calling process.

For I/O-bound work and for code that releases the GIL.  Threads cannot be
killed, so this backend does not offer ``timeout=``; recipes are built once
per process and shared by its threads.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

from procession import worker
from procession.backends.base import Backend, Capabilities, TaskFuture
from procession.errors import WorkerCrashedError

__all__ = ["ThreadBackend"]


class ThreadBackend(Backend):
    """A ``concurrent.futures.ThreadPoolExecutor`` moving task bytes."""

    name: ClassVar[str] = "threads"
    capabilities = Capabilities(isolated=False, kill=False, crash_detection=False)

    def __init__(self, *, workers: int | None = None, worker_setup: bytes | None = None) -> None:
        super().__init__(workers=workers, worker_setup=worker_setup)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._init_error: BaseException | None = None
        self._unfinished: set[TaskFuture] = set()

    def _initialize(self) -> None:
        error = worker.initializer_failure(self.worker_setup)
        if error is not None:
            self._init_error = error

    def start(self) -> None:
        with self._lock:
            if self._pool is None:
                self._init_error = None
                self._pool = ThreadPoolExecutor(
                    max_workers=self.workers,
                    thread_name_prefix="procession-thread",
                    initializer=self._initialize if self.worker_setup is not None else None,
                )

    def _run(self, future: TaskFuture, task: bytes) -> None:
        if not future.set_running_or_notify_cancel():
            with self._lock:
                self._unfinished.discard(future)
            return
        if self._init_error is not None:
            future.settle(exc=self._init_error)
            return
        future.mark_started(threading.current_thread().name)
        # settle(): shutdown(kill=True) may have failed this future already.
        try:
            future.settle(worker.run_task(task))
        except BaseException as exc:
            future.settle(exc=exc)
        finally:
            with self._lock:
                self._unfinished.discard(future)

    def submit(self, task: bytes) -> TaskFuture:
        self.start()
        future = TaskFuture()
        with self._lock:
            if self._pool is None:
                raise RuntimeError(f"{self!r} was shut down; create a new backend")
            self._unfinished.add(future)
            self._pool.submit(self._run, future, task)
        return future

    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            unfinished = list(self._unfinished) if kill else []
        if pool is not None:
            # A running thread cannot be stopped: kill=True drops queued work and
            # fails every unfinished future, so nobody waits for the thread.
            pool.shutdown(wait=wait and not kill, cancel_futures=kill)
        for future in unfinished:
            if future.cancel():
                # Acknowledge the cancellation so concurrent.futures.wait() sees it done.
                with contextlib.suppress(RuntimeError):
                    future.set_running_or_notify_cancel()
                continue
            future.settle(
                exc=WorkerCrashedError("the thread pool was shut down before this task finished")
            )

    @property
    def started(self) -> bool:
        return self._pool is not None
