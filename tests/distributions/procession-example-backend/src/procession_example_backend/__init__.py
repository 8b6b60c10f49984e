"""A third-party backend and adapter, written against procession's public plug-in API only."""

from __future__ import annotations

from typing import Any

import procession
from procession import worker

__all__ = ["Handle", "InlineBackend", "register_adapters"]


class InlineBackend(procession.Backend):
    """Runs each task in the caller at submit time."""

    name = "example-inline"
    capabilities = procession.Capabilities(isolated=False, kill=False, crash_detection=False)

    def __init__(self, *, workers: int | None = None, worker_setup: bytes | None = None) -> None:
        super().__init__(workers=1, worker_setup=worker_setup)
        self.tasks_run = 0
        self._initialized = False
        self._init_error: BaseException | None = None

    def start(self) -> None:
        if not self._initialized:
            # A failing initializer fails every task, as on procession's own backends.
            self._init_error = worker.initializer_failure(self.worker_setup)
            self._initialized = True

    def submit(self, task: bytes) -> procession.TaskFuture:
        self.start()
        future = procession.TaskFuture()
        future.set_running_or_notify_cancel()
        if self._init_error is not None:
            future.settle(exc=self._init_error)
            return future
        future.mark_started("inline")
        self.tasks_run += 1
        future.settle(worker.run_task(task))
        return future

    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        pass


class Handle:
    """Stands for a C-extension handle: refuses to pickle, rebuilt from its name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> Any:
        raise TypeError("cannot pickle 'Handle' object")


def _reopen(name: str) -> Handle:
    return Handle(name)


def register_adapters() -> None:
    procession.register_adapter(Handle, lambda h: procession.Recipe(_reopen, h.name))
