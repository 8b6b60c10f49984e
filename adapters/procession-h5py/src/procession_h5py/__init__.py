"""procession adapters for h5py: send ``h5py.File``, ``Group`` and ``Dataset`` handles.

An HDF5 handle is a C-level file descriptor and cannot be pickled.  With this
plug-in installed, a handle opened read-only travels as a
:class:`procession.Recipe`: "open this file name read-only, then this object
path".  Each worker opens the file once and reuses it for every later task
(and every later ``map``) on that worker.

Example::

    f = h5py.File("data.h5", "r")
    rows = procession.map(lambda i, ds=f["x"]: ds[i].sum(), range(len(f["x"])))

Refused, with advice: handles opened for writing (HDF5 allows one writer,
and a worker's read would not see unflushed writes), in-memory files
(``driver="core"`` without a backing store) and closed handles.

The adapters are registered through the ``procession.adapters`` entry point;
registration names the types by module and name, so h5py is imported only
when a handle is actually sent.
"""

from __future__ import annotations

from typing import Any

import procession
from procession import Recipe, SerializationError

__all__ = ["open_dataset", "open_file", "open_group", "register_adapters"]

_FILE = "h5py._hl.files.File"
_GROUP = "h5py._hl.group.Group"
_DATASET = "h5py._hl.dataset.Dataset"

_ADVICE = (
    "open it read-only (h5py.File(path, 'r')) before sending it, or send the file name "
    "and open it in the task"
)


def open_file(filename: str) -> Any:
    """Open ``filename`` read-only (the factory workers call; cached per worker)."""
    import h5py

    return h5py.File(filename, "r")


def open_group(file: Any, name: str) -> Any:
    """The group at object path ``name`` in an open file."""
    return file if name == "/" else file[name]


def open_dataset(file: Any, name: str) -> Any:
    """The dataset at object path ``name`` in an open file."""
    return file[name]


def _refuse(obj: Any, what: str, reason: str) -> SerializationError:
    return SerializationError(
        f"cannot send {what}: {reason}; {_ADVICE}",
        type_name=f"{type(obj).__module__}.{type(obj).__qualname__}",
    )


def _file_recipe(obj: Any, what: str) -> Recipe[Any]:
    """The recipe for the file that ``obj`` (a file, group or dataset) lives in."""
    if not obj.id.valid:
        raise _refuse(obj, what, "the handle is closed")
    file = obj.file
    if file.driver == "core":
        raise _refuse(
            obj,
            what,
            f"{file.filename!r} is an in-memory file (driver='core'), which a worker "
            "cannot reopen; write it to disk first",
        )
    if file.mode != "r":
        raise _refuse(
            obj,
            what,
            f"{file.filename!r} is open for writing (mode {file.mode!r}); HDF5 "
            "allows one writer and workers could not see unflushed data",
        )
    return Recipe(open_file, file.filename)


def reduce_group(group: Any) -> Recipe[Any]:
    """A File or Group: reopen the file read-only and look up the group by path."""
    what = f"h5py {'File' if group.name == '/' else 'Group ' + repr(group.name)}"
    file_recipe = _file_recipe(group, what)
    if group.name == "/":
        return file_recipe
    return Recipe(open_group, file_recipe, group.name)


def reduce_dataset(dataset: Any) -> Recipe[Any]:
    """A Dataset: reopen its file read-only and look up the dataset by path."""
    if not dataset.id.valid:
        raise _refuse(dataset, "an h5py Dataset", "the handle is closed")
    if dataset.name is None:
        raise _refuse(dataset, "an anonymous h5py Dataset", "it has no object path")
    file_recipe = _file_recipe(dataset, f"h5py Dataset {dataset.name!r}")
    return Recipe(open_dataset, file_recipe, dataset.name)


def register_adapters() -> None:
    """Entry-point hook (group ``procession.adapters``): register the h5py adapters."""
    # Resources: a read-only file handle has no position or other state a task
    # could change for the next, so each worker opens it once and shares it.
    procession.register_adapter(_GROUP, reduce_group, kind="resource")  # File subclasses Group
    procession.register_adapter(_DATASET, reduce_dataset, kind="resource")
