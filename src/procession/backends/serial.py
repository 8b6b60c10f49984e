"""The ``serial`` backend: every task runs in the calling thread, at submit.

For debugging (a breakpoint in the task works) and as the reference the other
backends are compared with.  Tasks still go through the serializer, so a
function that works here also crosses a process boundary.
"""

from __future__ import annotations

from typing import ClassVar

from procession import worker
from procession.backends.base import Backend, Capabilities, TaskFuture

__all__ = ["SerialBackend"]


class SerialBackend(Backend):
    """Runs each task synchronously in the caller; one worker."""

    name: ClassVar[str] = "serial"
    capabilities = Capabilities(isolated=False, kill=False, crash_detection=False)
    max_workers: ClassVar[int | None] = 1

    def __init__(self, *, workers: int | None = None, worker_setup: bytes | None = None) -> None:
        super().__init__(workers=1 if workers is None else workers, worker_setup=worker_setup)
        if self.workers != 1:
            raise ValueError(
                f"the serial backend runs one task at a time in the caller, so workers="
                f"{workers} cannot be honoured; drop workers= or use backend='threads' or "
                f"'process'"
            )
        self._initialized = False
        self._init_error: BaseException | None = None

    def start(self) -> None:
        if not self._initialized:
            self._init_error = worker.initializer_failure(self.worker_setup)
            self._initialized = True

    def submit(self, task: bytes) -> TaskFuture:
        self.start()
        future = TaskFuture()
        future.set_running_or_notify_cancel()
        if self._init_error is not None:
            future.settle(exc=self._init_error)
            return future
        future.mark_started("caller")
        try:
            future.settle(worker.run_task(task))
        except BaseException as exc:
            future.settle(exc=exc)
        return future

    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        self._initialized = False
