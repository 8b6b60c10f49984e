"""The rule for parallel work started from inside a task (nested maps).

A ``procession.map``, ``Executor`` or ``Pipeline`` called by code that is
itself running as a procession task (:func:`procession.worker.in_worker`)
follows joblib's rule for nested ``Parallel``:

- **By default it starts no new pool**: ``backend=None`` runs the nested work
  inline, in the worker that called it (the ``serial`` backend).  The outer
  map already keeps every core busy; a second pool per task would only
  oversubscribe them, and on ``threads`` it would wait on the very pool its
  caller occupies (a deadlock).
- **An explicit in-process backend** (``"threads"``, ``"serial"``, or a
  plug-in whose tasks run in the caller's process) is honoured; a nested
  ``"threads"`` map gets its own warm pool, one per nesting level, so outer
  tasks never wait on threads they hold themselves.
- **An explicit process backend** (``"process"``, ``"loky"``,
  ``"multiprocessing"``, ``"dask"`` ...) is refused with
  :class:`NestedParallelismError`, which says why and what to do: worker
  processes started from a worker outlive their pool's bookkeeping, cannot
  start at all on some backends (daemonic Dask workers, ``__main__`` that does
  not exist in a loky or multiprocessing worker), and oversubscribe the CPUs.

A ``Backend`` instance is the caller's explicit choice and is never replaced.

Example::

    def outer(n):
        # inline in this worker: no new pool, no deadlock
        return sum(procession.map(abs, range(-n, 0)))

    list(procession.map(outer, [3, 4], backend="threads"))  # [6, 10]
"""

from __future__ import annotations

from procession import worker
from procession.errors import NestedParallelismError

__all__ = ["NestedParallelismError", "nested_backend", "nesting_level"]

#: What a nested call runs on when it names no backend.
NESTED_DEFAULT = "serial"


def nesting_level() -> int:
    """How many procession tasks the calling thread is inside (0 outside any task)."""
    if not worker.in_worker():
        return 0
    # in_worker() is the public contract; the depth refines it where the
    # runtime records one (it does today), else one level is assumed.
    depth = getattr(getattr(worker, "_task_context", None), "depth", 1)
    return depth if isinstance(depth, int) and depth > 0 else 1


def nested_backend(requested: str | None, *, what: str = "procession.map()") -> str | None:
    """The backend name a call made inside a task must use, or None outside a task.

    ``requested`` is the name the caller gave (None: no ``backend=``).  Raises
    :class:`NestedParallelismError` for an explicit process backend.
    """
    if not worker.in_worker():
        return None
    if requested is None:
        return NESTED_DEFAULT
    from procession.backends.registry import get_backend_class

    factory = get_backend_class(requested)
    capabilities = getattr(factory, "capabilities", None)
    isolated = getattr(capabilities, "isolated", True)
    if isinstance(isolated, bool) and not isolated:
        return requested
    raise NestedParallelismError(
        f"{what} with backend={requested!r} was called inside a procession task: a task "
        f"may not start a pool of worker processes of its own (it would oversubscribe "
        f"the CPUs the outer map already uses, and worker processes cannot reliably "
        f"start and stop more processes). Drop backend= to run the nested work inline "
        f"in this worker, use backend='threads' for I/O-bound nested work, or "
        f"parallelise the outer level only (flatten the work into one map)"
    )
