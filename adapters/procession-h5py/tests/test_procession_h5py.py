"""procession-h5py against real HDF5 files, through real worker processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from procession_h5py import reduce_dataset, reduce_group

import procession
from procession import SerializationError
from procession.serialization.adapters import find_adapter, find_reducer

# Tasks are defined inside the tests (sent by value): the workers cannot
# import this test module.


@pytest.fixture
def h5_path(tmp_path: Path) -> Path:
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("grp/x", data=np.arange(100, dtype=np.int64))
        f["grp"].attrs["label"] = "numbers"
        f.create_dataset("y", data=np.arange(10) * 2.5)
    return path


@pytest.fixture
def readonly(h5_path: Path) -> Iterator[h5py.File]:
    with h5py.File(h5_path, "r") as f:
        yield f


def test_registered_through_the_entry_point() -> None:
    assert find_reducer(h5py.File) is reduce_group
    assert find_reducer(h5py.Group) is reduce_group
    assert find_reducer(h5py.Dataset) is reduce_dataset
    # Resources: opened once per worker and shared, not rebuilt for every task.
    kinds = {find_adapter(t).kind for t in (h5py.File, h5py.Dataset)}  # type: ignore[union-attr]
    assert kinds == {"resource"}


@pytest.mark.parametrize("backend", ["process", "threads"])
def test_dataset_is_reopened_read_only_once_per_worker(readonly: h5py.File, backend: str) -> None:
    filename = readonly.filename

    def probe(i: int, ds: h5py.Dataset = readonly["grp/x"]) -> tuple[int, int, str, int]:
        from procession_h5py import open_file

        from procession.serialization.recipes import Recipe, build_count

        return os.getpid(), int(ds[i]), ds.file.mode, build_count(Recipe(open_file, filename))

    rows = list(procession.map(probe, range(100), backend=backend, chunksize=5))
    assert [value for _, value, _, _ in rows] == list(range(100))
    assert {mode for _, _, mode, _ in rows} == {"r"}
    # Every worker opened the file exactly once, however many tasks it ran.
    assert {count for _, _, _, count in rows} == {1}
    if backend == "process":
        assert os.getpid() not in {pid for pid, _, _, _ in rows}


def test_file_and_group_handles(readonly: h5py.File) -> None:
    def read(i: int, f: h5py.File = readonly, g: h5py.Group = readonly["grp"]) -> tuple[Any, ...]:
        return float(f["y"][i]), int(g["x"][i]), g.attrs["label"], g.name

    got = list(procession.map(read, range(10), backend="process"))
    assert got == [(i * 2.5, i, "numbers", "/grp") for i in range(10)]


def test_write_mode_is_refused_with_advice(h5_path: Path) -> None:
    with h5py.File(h5_path, "a") as f:
        with pytest.raises(SerializationError, match="open for writing") as info:
            procession.check_picklable(f["grp/x"])
        assert "h5py.File(path, 'r')" in str(info.value)
        with pytest.raises(SerializationError, match="open for writing"):
            list(procession.map(lambda i, f=f: i, range(3), backend="process"))


def test_in_memory_file_is_refused(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "mem.h5", "w", driver="core", backing_store=False) as f:
        f["x"] = np.arange(3)
        with pytest.raises(SerializationError, match="in-memory"):
            procession.check_picklable(f["x"])


def test_closed_handle_is_refused(h5_path: Path) -> None:
    f = h5py.File(h5_path, "r")
    ds = f["y"]
    f.close()
    with pytest.raises(SerializationError, match="closed"):
        procession.check_picklable(ds)
