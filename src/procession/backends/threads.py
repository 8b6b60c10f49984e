"""The ``threads`` backend: a pool of threads in the calling process.

For I/O-bound work and for code that releases the GIL.  Threads cannot be
killed, so this backend does not offer ``timeout=``; recipes are built once
per process and shared by its threads.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

from procession import worker
from procession.backends.base import Backend, Capabilities, TaskFuture

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

    def _initialize(self) -> None:
        try:
            worker.initialize_worker(self.worker_setup)
        except BaseException as exc:
            self._init_error = exc

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
            return
        if self._init_error is not None:
            future.set_exception(self._init_error)
            return
        future.mark_started(threading.current_thread().name)
        try:
            future.set_result(worker.run_task(task))
        except BaseException as exc:
            future.set_exception(exc)

    def submit(self, task: bytes) -> TaskFuture:
        self.start()
        assert self._pool is not None
        future = TaskFuture()
        self._pool.submit(self._run, future, task)
        return future

    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            # A running thread cannot be stopped; kill=True only drops queued work.
            pool.shutdown(wait=wait and not kill, cancel_futures=kill)

    @property
    def started(self) -> bool:
        return self._pool is not None
