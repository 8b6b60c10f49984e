"""The ``multiprocessing`` backend: standard-library semantics, made crash-safe.

For code that expects what the standard library does: pickle is the default
serializer (functions travel by reference and must be importable in the
workers), and under ``spawn``/``forkserver`` every worker imports the parent's
``__main__`` first, so scripts need the ``if __name__ == "__main__":`` guard.

Why not :class:`multiprocessing.Pool`?  Its workers share one task queue and
one result queue, each guarded by a lock.  A worker killed while it holds one
of those locks (reading its next task, writing a result) deadlocks every other
worker, and a worker killed mid-task loses its task without a trace, so
``Pool.map`` waits forever.  Nothing outside the pool can tell which task the
dead worker was running.  One pipe per worker removes both problems: a worker
owns no shared lock, and the parent always knows what each worker is doing.

That is exactly how procession's own pool works, so this backend *is* that
pool (:class:`~procession.backends.process.ProcessBackend`: multiprocessing
``Process`` objects from an explicit context, one duplex pipe each, a
dispatcher thread) with the standard library's defaults.  It has the same
guarantees: a dead worker fails only its own task (``WorkerCrashedError``
naming the signal) and is replaced; ``kill_task`` makes ``timeout=`` work; no
worker outlives the parent; workers ignore Ctrl-C; an initializer that raises
is reported once, and workers that keep dying while starting (typically a
script without the main guard) stop the pool with that advice instead of
being respawned forever; worker output reaches the parent.
"""

from __future__ import annotations

from typing import ClassVar

from procession.backends._worker_process import describe_exit
from procession.backends.process import ProcessBackend

__all__ = ["MultiprocessingBackend", "describe_exit"]


class MultiprocessingBackend(ProcessBackend):
    """Stdlib multiprocessing workers with pickle by default (crash-safe, killable).

    Options: ``workers``, ``start_method`` (default forkserver where it exists,
    else spawn; the global default is never touched), ``max_tasks_per_worker``,
    ``worker_setup``, ``forward_output``.

    Example::

        backend = procession.create_backend("multiprocessing", start_method="spawn")
    """

    name: ClassVar[str] = "multiprocessing"
    default_serializer: ClassVar[str] = "pickle"
    children_rerun_main: ClassVar[bool] = True
    startup_failure_advice: ClassVar[str] = (
        "Under spawn and forkserver every worker first imports the parent's __main__: "
        'guard the code that starts work with `if __name__ == "__main__":`, and check '
        "the initializer and the worker's imports"
    )
