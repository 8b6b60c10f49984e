"""Large buffers through shared memory: round trips, copy-on-write, lifetime, fallbacks."""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import procession
from procession.api import resolve_backend
from procession.errors import WorkerCrashedError
from procession.serialization import diagnostics, get_serializer, shm
from procession.serialization.shm import arena as arena_module

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


def _same_machine(backend_name: str) -> bool:
    """Whether the backend's workers get large buffers through shared memory."""
    capabilities = procession.available_backends()[backend_name].capabilities
    assert capabilities is not None
    return capabilities.isolated and not capabilities.remote


# Crash tests run on the local pools that share /dev/shm and promise crash detection;
# remote backends (dask) send large buffers in-band, and their workers are not
# this process's children (as in test_faults.py).
SHM_CRASH_BACKENDS = sorted(
    name
    for name, info in procession.available_backends().items()
    if info.usable
    and info.origin == "built-in"
    and info.capabilities is not None
    and info.capabilities.isolated
    and info.capabilities.crash_detection
    and not info.capabilities.remote
)


def _ours() -> list[str]:
    return sorted(shm.segment_names(shm.owner_prefix()))


@pytest.fixture(autouse=True)
def no_leftover_segments() -> Iterator[None]:
    """Every test here must leave no segment of this process in /dev/shm or the temp folder."""
    yield
    deadline = time.monotonic() + 5.0
    while _ours() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _ours() == [], "segments left behind"


@pytest.fixture
def parent_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the segments this (parent) process writes."""
    sizes: list[int] = []
    real = arena_module.write_segment

    def counting(name: str, data: memoryview, directories: tuple[str, str]) -> str:
        sizes.append(len(data))
        return real(name, data, directories)

    monkeypatch.setattr(arena_module, "write_segment", counting)
    return sizes


@pytest.fixture
def stored_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the buffers handed to a backend's store (Dask's scatter), in this process."""
    sizes: list[int] = []
    from procession.backends.dask import DaskBackend

    real = DaskBackend.store_buffer

    def counting(self: DaskBackend, data: bytes) -> procession.StoredBuffer:
        sizes.append(len(data))
        return real(self, data)

    monkeypatch.setattr(DaskBackend, "store_buffer", counting)
    return sizes


def _stores_buffers(backend_name: str) -> bool:
    """Whether the backend keeps large arguments itself (Dask: scattered once per map)."""
    capabilities = procession.available_backends()[backend_name].capabilities
    assert capabilities is not None
    return capabilities.buffer_store and not _same_machine(backend_name)


def _executor(backend_name: str) -> procession.Executor:
    """An Executor with 2 workers.  On dask, over the warm shared LocalCluster
    (an Executor does not stop a backend instance it was given): starting a
    cluster per test would cost seconds each, and test_backend_dask.py covers
    an Executor's own cluster."""
    if backend_name == "dask":
        return procession.Executor(backend=resolve_backend("dask", 2))
    return procession.Executor(backend=backend_name, workers=2)


# -- functions run in workers (module level: every serializer can send them) ---


def digest_of(value: Any) -> tuple[str, str, tuple[int, ...], bool]:
    array = np.asarray(value)
    return (
        hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest(),
        array.dtype.str,
        array.shape,
        bool(array.flags.writeable),
    )


def echo(value: Any) -> Any:
    return value


def add_one_in_place(array: np.ndarray) -> float:
    array += 1  # copy-on-write: the parent's array must not change
    return float(array.sum())


def add_one_and_return(array: np.ndarray) -> np.ndarray:
    array += 1
    return array


def describe(value: Any) -> tuple[str, bytes]:
    return type(value).__name__, bytes(memoryview(value).cast("B")) if value is not None else b""


def memmap_info(array: np.ndarray) -> tuple[str, str | None, list[float]]:
    filename = getattr(array, "filename", None) or getattr(array.base, "filename", None)
    return type(array).__name__, filename, array.ravel().tolist()[:4]


def fail_with_large_argument(array: np.ndarray) -> None:
    raise ValueError(f"refused an array of {array.nbytes} bytes")


def die_holding(array: np.ndarray) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def make_large(nbytes: int) -> np.ndarray:
    return np.full(nbytes // 8, 7.0)


def sum_of(array: np.ndarray, _: int) -> float:
    return float(array.sum())


# -- the format: what goes out of band, what stays in-band ---------------------


def test_small_arguments_stay_in_band() -> None:
    arena = shm.Arena(threshold=MiB)
    try:
        items = [1, "two", 3.0, np.arange(10), b"x" * 100, bytearray(50)]
        data, lease = arena.dumps_leased(get_serializer("cloudpickle"), items)
        assert lease is not None and lease.segments == []
        assert _ours() == []
        loaded, reply = shm.load_payload(get_serializer("cloudpickle"), data, private=True)
        assert loaded[:3] == items[:3] and np.array_equal(loaded[3], items[3])
        assert loaded[4:] == items[4:] and type(loaded[5]) is bytearray
        assert isinstance(reply, shm.Reply)  # the worker knows where large results may go
    finally:
        arena.close()


@pytest.mark.parametrize("serializer", ["pickle", "cloudpickle", "dill"])
def test_large_array_leaves_the_byte_stream(serializer: str) -> None:
    chosen = get_serializer(serializer)
    array = np.arange(MiB // 4, dtype=np.float64)  # 2 MiB
    arena = shm.Arena(threshold=MiB)
    try:
        data, lease = arena.dumps_leased(chosen, [array])
        assert len(data) < 4096  # the 2 MiB went to a segment
        assert lease is not None and [s.nbytes for s in lease.segments] == [array.nbytes]
        loaded, _ = shm.load_payload(chosen, data, private=True)
        assert np.array_equal(loaded[0], array) and loaded[0].flags.writeable
        loaded[0][:] = -1  # copy-on-write: neither the segment nor the parent changes
        again, _ = shm.load_payload(chosen, data, private=True)
        assert np.array_equal(again[0], array) and array[1] == 1.0
        arena.release(lease)
        assert _ours() == []
    finally:
        arena.close()


def test_results_are_adopted_and_unlinked_at_once() -> None:
    arena = shm.Arena(threshold=MiB)
    chosen = get_serializer("pickle")
    try:
        task, _ = arena.dumps_leased(chosen, [1])
        _, reply = shm.load_payload(chosen, task, private=True)
        result = reply.dumps(chosen, [np.ones(MiB)])  # as a worker would
        assert len(_ours()) == 1
        values = arena.loads(chosen, result)
        assert _ours() == []  # unlinked the moment it was mapped
        assert values[0].sum() == MiB and values[0].flags.writeable
        values[0][0] = 5.0  # the parent owns it now
        assert values[0][0] == 5.0
    finally:
        arena.close()


def test_same_object_is_written_once_and_changes_are_seen(parent_writes: list[int]) -> None:
    chosen = get_serializer("cloudpickle")
    array = np.zeros(MiB // 4)
    arena = shm.Arena(threshold=MiB)
    try:
        _, lease1 = arena.dumps_leased(chosen, [array, array])
        second, lease2 = arena.dumps_leased(chosen, [array])
        assert parent_writes == [array.nbytes]
        array[0] = 42.0  # changed in place (a reused buffer): must not send stale data
        third, lease3 = arena.dumps_leased(chosen, [array])
        assert parent_writes == [array.nbytes, array.nbytes]
        assert shm.load_payload(chosen, third, private=True)[0][0][0] == 42.0
        assert shm.load_payload(chosen, second, private=True)[0][0][0] == 0.0
        for lease in (lease1, lease2, lease3):
            arena.release(lease)
        # The one sent several times stays for the rest of the map; the other is gone.
        assert len(_ours()) == 1
    finally:
        arena.close()
    assert _ours() == []


def test_bytes_bytearray_memoryview_round_trip() -> None:
    chosen = get_serializer("pickle")
    payload = bytes(range(256)) * (MiB // 256 + 1)
    values = [
        payload,
        bytearray(payload),
        memoryview(payload),
        memoryview(np.arange(MiB // 4, dtype=np.int64)).cast("B").cast("q"),
        {"nested": (payload, [payload])},
    ]
    arena = shm.Arena(threshold=MiB)
    try:
        data, lease = arena.dumps_leased(chosen, values)
        assert len(data) < 8192
        assert lease is not None and len(lease.segments) >= 4
        loaded, _ = shm.load_payload(chosen, data, private=True)
        assert loaded[0] == payload and type(loaded[0]) is bytes
        assert loaded[1] == payload and type(loaded[1]) is bytearray
        assert type(loaded[2]) is memoryview and loaded[2].readonly
        assert loaded[2].tobytes() == payload
        assert loaded[3].format == "q" and loaded[3].tolist() == list(range(MiB // 4))
        assert loaded[4]["nested"][0] == payload and loaded[4]["nested"][1][0] == payload
    finally:
        arena.close()


def test_memoryview_pickles_in_band_too() -> None:
    view = memoryview(np.arange(12, dtype=np.int32)).cast("B").cast("i", (3, 4))
    loaded = get_serializer("pickle").loads(get_serializer("pickle").dumps(view))
    assert loaded.shape == (3, 4) and loaded.tolist() == view.tolist()


def test_non_contiguous_array_is_copied_once_into_a_segment(parent_writes: list[int]) -> None:
    chosen = get_serializer("pickle")
    base = np.arange(MiB // 2, dtype=np.float64).reshape(512, -1)
    strided = base[::2, ::3]
    arena = shm.Arena(threshold=1024)
    try:
        data, _ = arena.dumps_leased(chosen, strided)
        assert parent_writes == [strided.nbytes]  # the contiguous copy, not the base
        loaded, _ = shm.load_payload(chosen, data, private=True)
        assert np.array_equal(loaded, strided)
    finally:
        arena.close()


def test_memmap_is_sent_by_file_name(tmp_path: Path, parent_writes: list[int]) -> None:
    path = tmp_path / "data.bin"
    full = np.memmap(path, dtype=np.float32, mode="w+", offset=24, shape=(400, 300))
    full[:] = np.arange(full.size, dtype=np.float32).reshape(full.shape)
    full.flush()
    chosen = get_serializer("cloudpickle")
    views = [full, full[10:20], full[::-3, 5::7], full.T]
    arena = shm.Arena(threshold=1 << 40)  # nothing would go through segments anyway
    try:
        data, _ = arena.dumps_leased(chosen, views)
        assert len(data) < 4096 and parent_writes == []
        loaded, _ = shm.load_payload(chosen, data, private=True)
        for sent, got in zip(views, loaded, strict=True):
            assert isinstance(got, np.memmap) or isinstance(got.base, np.memmap)
            assert np.array_equal(got, sent) and got.strides == sent.strides
        loaded[0][0, 0] = -1.0  # copy-on-write: the file keeps its data
        assert full[0, 0] == 0.0
    finally:
        arena.close()
        del full


def test_full_shm_falls_back_to_the_temp_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arena_module, "_room", lambda directory: 0)
    owner = arena_module._get_owner()
    monkeypatch.setattr(owner, "warned_full", False)
    chosen = get_serializer("pickle")
    arena = shm.Arena(threshold=1024)
    try:
        with pytest.warns(shm.SharedMemoryFullWarning, match="/dev/shm has no room"):
            data, lease = arena.dumps_leased(chosen, [np.ones(4096)])
        assert lease is not None
        assert lease.segments[0].where.startswith(arena_module._directories()[1])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # only once
            arena.dumps_leased(chosen, [np.ones(4097)])
        assert np.array_equal(shm.load_payload(chosen, data, private=True)[0][0], np.ones(4096))
    finally:
        arena.close()


def test_shared_array_falls_back_to_the_temp_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arena_module, "_room", lambda directory: 0)
    monkeypatch.setattr(arena_module._get_owner(), "warned_full", False)
    with pytest.warns(shm.SharedMemoryFullWarning, match="/dev/shm has no room"):
        shared = shm.shared_array(np.arange(1000.0))
    assert str(shared.filename).startswith(arena_module._directories()[1])
    assert np.array_equal(shared, np.arange(1000.0))
    del shared


def test_threshold_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert shm.parse_size("4MiB") == 4 * MiB and shm.parse_size(" 512k ") == 512 * 1024
    assert shm.parse_size(1) == 1
    with pytest.raises(ValueError, match="cannot read 'lots' as a size"):
        shm.parse_size("lots")
    with pytest.raises(ValueError, match="at least 1 byte"):
        shm.parse_size(0)
    assert shm.current() == shm.LargeBuffers(True, shm.DEFAULT_THRESHOLD)
    monkeypatch.setenv(shm.ENV_THRESHOLD, "8MiB")
    assert shm.current().threshold == 8 * MiB
    with shm.large_buffers(threshold="2k"):
        assert shm.current() == shm.LargeBuffers(True, 2048)
        with shm.large_buffers(enabled=False):
            assert not shm.current().enabled
    monkeypatch.setenv(shm.ENV_THRESHOLD, "off")
    assert not shm.current().enabled
    monkeypatch.setenv(shm.ENV_THRESHOLD, "huge")
    with pytest.raises(ValueError, match=shm.ENV_THRESHOLD):
        shm.current()


def test_only_same_machine_process_backends_get_an_arena() -> None:
    assert shm.arena_for(procession.create_backend("threads", workers=1)) is shm.IN_BAND
    # Dask keeps buffers itself (scatter): a store-backed arena, no shared memory.
    dask_backend = procession.create_backend("dask", workers=1)
    stored = shm.arena_for(dask_backend)
    assert isinstance(stored, shm.StoredArena) and stored.stored
    stored.close()
    assert not dask_backend.started
    backend = procession.create_backend("process", workers=1)
    arena = shm.arena_for(backend)
    try:
        assert isinstance(arena, shm.Arena)
    finally:
        arena.close()
    with shm.large_buffers(enabled=False):
        assert shm.arena_for(backend) is shm.IN_BAND


def test_a_serializer_without_buffer_support_stays_in_band() -> None:
    class Plain(procession.Serializer):
        name = "plain-for-buffers-test"

        def dumps(self, obj: Any) -> bytes:
            return pickle.dumps(obj, 5)

        def loads(self, data: bytes) -> Any:
            return pickle.loads(data)

    arena = shm.Arena(threshold=1024)
    try:
        data, lease = arena.dumps_leased(Plain(), [np.ones(4096)])
        assert lease is None and not data.startswith(shm.arena.MAGIC)
        assert np.array_equal(arena.loads(Plain(), data)[0], np.ones(4096))
    finally:
        arena.close()


# -- diagnostics ----------------------------------------------------------------


def test_out_of_band_report_lists_large_buffers(tmp_path: Path) -> None:
    mapped = np.memmap(tmp_path / "m.bin", dtype=np.uint8, mode="w+", shape=(100,))
    obj = {"big": np.zeros(MiB // 8 * 3), "small": np.zeros(4), "file": mapped, "raw": b"x" * MiB}
    report = diagnostics.out_of_band_report(obj, threshold=MiB)
    kinds = sorted((entry.kind, entry.nbytes) for entry in report)
    assert kinds == [("file", 100), ("shared memory", MiB), ("shared memory", 3 * MiB)]
    text = diagnostics.describe_out_of_band(obj, threshold=MiB)
    assert "numpy.ndarray" in text and "3.0 MiB" in text and "m.bin" in text
    assert "in-band" in diagnostics.describe_out_of_band([1, 2], threshold=MiB)
    del mapped


# -- end to end, on every process backend -------------------------------------


def test_arrays_round_trip_bit_exactly(process_backend_name: str) -> None:
    with (
        shm.large_buffers(threshold=64),
        _executor(process_backend_name) as executor,
    ):

        @given(
            array=hnp.arrays(
                dtype=st.one_of(
                    hnp.boolean_dtypes(),
                    hnp.integer_dtypes(endianness="="),
                    hnp.unsigned_integer_dtypes(endianness="="),
                    hnp.floating_dtypes(endianness="="),
                    hnp.complex_number_dtypes(endianness="="),
                    hnp.datetime64_dtypes(endianness="="),
                ),
                shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=24),
            ),
            order=st.sampled_from(["C", "F", "strided"]),
        )
        def check(array: np.ndarray, order: str) -> None:
            if order == "F":
                array = np.asfortranarray(array)
            elif order == "strided":
                array = array[..., ::2]
            expected = digest_of(array)
            # As an argument: the worker sees the exact bytes, dtype and shape.
            (seen,) = executor.map(digest_of, [array])
            assert seen[:3] == expected[:3]
            # As a result: the parent gets the exact array back.
            (back,) = executor.map(echo, [array])
            assert digest_of(back)[:3] == expected[:3]
            if order == "F":
                assert back.flags.f_contiguous

        check()


def test_worker_writes_are_copy_on_write(process_backend_name: str) -> None:
    array = np.arange(MiB // 4, dtype=np.float64)
    before = array.copy()
    with _executor(process_backend_name) as executor:
        sums = list(executor.map(add_one_in_place, [array, array]))
        assert sums == [float((before + 1).sum())] * 2  # each task saw the original
        (changed,) = executor.map(add_one_and_return, [array])
        assert np.array_equal(changed, before + 1)
        future = executor.submit(add_one_and_return, array)
        assert np.array_equal(future.result(timeout=60), before + 1)
    assert np.array_equal(array, before)


def test_same_array_to_many_tasks_is_written_once(
    process_backend_name: str, parent_writes: list[int], stored_sizes: list[int]
) -> None:
    array = np.ones(MiB // 4)  # 2 MiB
    # Same machine: one shared-memory segment; dask: scattered once.
    written = stored_sizes if _stores_buffers(process_backend_name) else parent_writes
    with _executor(process_backend_name) as executor:
        totals = list(executor.map(float, [array.sum()] * 3))  # warm-up, nothing large
        assert parent_writes == stored_sizes == []
        totals = list(executor.map(sum_of, [array] * 12, range(12), chunksize=1))
        assert totals == [float(array.sum())] * 12
        assert written == [array.nbytes]
        # In the function (a partial): written once per map, not per task.
        totals = list(executor.map(functools.partial(sum_of, array), range(12), chunksize=1))
        assert totals == [float(array.sum())] * 12
        assert written == [array.nbytes] * 2

        # Items from a generator that changes the array in place between items:
        # each task sees the array as it was when its item was read.
        def refilled() -> Iterator[np.ndarray]:
            for value in range(4):
                array[:] = value
                yield array

        totals = list(executor.map(sum_of, refilled(), range(4), chunksize=1))
        assert totals == [float(value * array.size) for value in range(4)]
        future = executor.submit(sum_of, array, 0)
        assert future.result(timeout=60) == float(3 * array.size)
    # Four changed contents from the generator, one for the submitted call.
    assert written == [array.nbytes] * 7


def test_small_arguments_never_touch_shared_memory(
    process_backend_name: str, parent_writes: list[int]
) -> None:
    with _executor(process_backend_name) as executor:
        assert list(executor.map(echo, ["a", 1, b"x" * 1000, np.arange(5)]))[:3] == [
            "a",
            1,
            b"x" * 1000,
        ]
    assert parent_writes == []


def test_buffer_types_round_trip_through_workers(process_backend_name: str) -> None:
    payload = os.urandom(MiB + 3)
    with _executor(process_backend_name) as executor:
        results = list(executor.map(describe, [payload, bytearray(payload), memoryview(payload)]))
        assert results == [("bytes", payload), ("bytearray", payload), ("memoryview", payload)]
        back = list(executor.map(echo, [payload, bytearray(payload), memoryview(payload)]))
        assert back[0] == payload and type(back[0]) is bytes
        assert back[1] == payload and type(back[1]) is bytearray
        assert type(back[2]) is memoryview and back[2].tobytes() == payload


def arrow_summary(value: Any) -> tuple[str, int]:
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(value, pa.Table):
        return "Table", int(pc.sum(value.column("x")).as_py())
    return type(value).__name__, len(value.to_pybytes())


def test_pyarrow_buffers_and_tables_round_trip(
    process_backend_name: str, parent_writes: list[int], stored_sizes: list[int]
) -> None:
    import pyarrow as pa  # a dev dependency

    buffer = pa.py_buffer(os.urandom(2 * MiB))
    table = pa.table({"x": np.arange(MiB // 4, dtype=np.int64)})
    with _executor(process_backend_name) as executor:
        seen = list(executor.map(arrow_summary, [buffer, table]))
        assert seen == [("Buffer", 2 * MiB), ("Table", int(np.arange(MiB // 4).sum()))]
        if _same_machine(process_backend_name):
            assert sorted(parent_writes) == [2 * MiB, 2 * MiB]  # both out of band
        elif _stores_buffers(process_backend_name):
            assert sorted(stored_sizes) == [2 * MiB, 2 * MiB]
        (back,) = executor.map(echo, [table])
        assert back.equals(table)
        (raw,) = executor.map(echo, [buffer])
        assert raw.equals(buffer)


def test_memmap_reaches_workers_by_name(process_backend_name: str, tmp_path: Path) -> None:
    mapped = np.memmap(tmp_path / "a.bin", dtype=np.float64, mode="w+", shape=(MiB,))
    mapped[:] = np.arange(MiB)
    mapped.flush()
    with _executor(process_backend_name) as executor:
        (info,) = executor.map(memmap_info, [mapped[8:]])
    if _same_machine(process_backend_name):
        assert info == ("memmap", str(tmp_path / "a.bin"), [8.0, 9.0, 10.0, 11.0])
    else:  # dask workers may be elsewhere: the data travel
        assert info[1:] == (None, [8.0, 9.0, 10.0, 11.0])
    del mapped


def test_task_error_leaves_no_segment(process_backend_name: str) -> None:
    with _executor(process_backend_name) as executor:
        with pytest.raises(ValueError, match="refused an array of 2097152 bytes"):
            list(executor.map(fail_with_large_argument, [np.zeros(MiB // 4)] * 3))
        future = executor.submit(fail_with_large_argument, np.zeros(MiB // 4))
        with pytest.raises(ValueError, match="refused"):
            future.result(timeout=60)
    # the autouse fixture checks /dev/shm


@pytest.mark.parametrize("crash_backend", SHM_CRASH_BACKENDS)
def test_worker_sigkill_leaves_no_segment(crash_backend: str) -> None:
    with (
        procession.Executor(backend=crash_backend, workers=2) as executor,
        pytest.raises(WorkerCrashedError),
    ):
        list(executor.map(die_holding, [np.zeros(MiB // 4)] * 2))


def test_large_results_of_small_calls_come_back_through_shared_memory(
    process_backend_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    adopted: list[int] = []
    real = arena_module.map_segment

    def counting(path: str, nbytes: int, *, private: bool) -> Any:
        if not private:
            adopted.append(nbytes)
        return real(path, nbytes, private=private)

    monkeypatch.setattr(arena_module, "map_segment", counting)
    with _executor(process_backend_name) as executor:
        (first,) = executor.map(make_large, [2 * MiB])
        second = executor.submit(make_large, 2 * MiB).result(timeout=60)
    assert first.sum() == second.sum() == 7.0 * (2 * MiB // 8)
    assert adopted == ([2 * MiB] * 2 if _same_machine(process_backend_name) else [])


def test_results_abandoned_mid_map_leave_no_segment(process_backend_name: str) -> None:
    with _executor(process_backend_name) as executor:
        run = executor.map(make_large, [2 * MiB] * 8, chunksize=1)
        first = next(iter(run))
        assert first.nbytes == 2 * MiB
        run.close()  # type: ignore[attr-defined]


def test_a_map_never_iterated_frees_its_segments() -> None:
    import gc

    with procession.Executor(backend="process", workers=2) as executor:
        run = executor.map(functools.partial(sum_of, np.ones(MiB // 4)), range(3))
        assert len(_ours()) == 1  # the function's array, written when the map was made
        del run
        gc.collect()
        assert _ours() == []


def test_ctrl_c_leaves_no_segment() -> None:
    def arrays() -> Iterator[np.ndarray]:
        yield np.zeros(MiB // 4)
        yield np.zeros(MiB // 4)
        raise KeyboardInterrupt

    with (
        procession.Executor(backend="process", workers=2) as executor,
        pytest.raises(KeyboardInterrupt),
    ):
        list(executor.map(echo, arrays(), chunksize=1))


PARENT_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    import numpy as np
    import procession
    from procession.serialization import shm

    def slow(array):
        time.sleep(60)

    if __name__ == "__main__":
        run = procession.map(slow, [np.zeros(1 << 18)] * 4, backend="process", workers=2)
        import threading
        threading.Thread(target=lambda: list(run), daemon=True).start()
        deadline = time.monotonic() + 30
        while not list(shm.segment_names(shm.owner_prefix())) and time.monotonic() < deadline:
            time.sleep(0.02)
        print(shm.owner_prefix(), flush=True)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_parent_sigkill_leaves_no_segment(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT)
    child = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=90, check=False
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    prefix = child.stdout.strip()
    assert prefix.startswith("procession-")
    deadline = time.monotonic() + 20
    while shm.segment_names and list(shm.segment_names(prefix)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(shm.segment_names(prefix)) == []


# -- the benchmark stays runnable ----------------------------------------------


def _run_benchmark(script: str, *arguments: str) -> str:
    """Run ``benchmarks/<script>`` at a tiny size; its standard output."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *arguments],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_arrays_benchmark_runs_at_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "arrays.json"
    printed = _run_benchmark("arrays.py", "--mib", "2", "--repeat", "1", "--json", str(out))
    assert "procession process" in printed and "shared_array" in printed and out.exists()


def test_dask_arguments_benchmark_runs_at_tiny_size() -> None:
    printed = _run_benchmark("dask_arguments.py", "--mib", "2", "--tasks", "4", "--repeat", "1")
    assert "stored once" in printed and "in-band /" in printed


def test_no_segment_left_in_any_directory() -> None:
    leftovers = [
        path
        for directory in arena_module._directories()
        for path in glob.glob(os.path.join(directory, shm.owner_prefix() + "*"))
    ]
    assert leftovers == []


def test_check_command_lists_out_of_band_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from procession.cli import cli

    (tmp_path / "bigdata_for_check.py").write_text(
        "import numpy as np\nBIG = {'weights': np.zeros(300_000), 'n': 3}\nSMALL = [1, 2]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    runner = CliRunner()
    big = runner.invoke(cli, ["check", "bigdata_for_check:BIG"])
    assert big.exit_code == 0, big.output
    assert "out-of-band on process backends (threshold 1.0 MiB): 1 part(s), 2.3 MiB" in big.output
    assert "shared memory" in big.output and "shape=(300000,)" in big.output
    small = runner.invoke(cli, ["check", "bigdata_for_check:BIG", "--threshold", "4MiB"])
    assert "out-of-band: nothing" in small.output
    plain = runner.invoke(cli, ["check", "bigdata_for_check:SMALL"])
    assert "out-of-band: nothing" in plain.output


# -- shared_array: a large array sent to many maps without a copy -------------------


def bump_and_describe(array: np.ndarray) -> tuple[float, str, bool]:
    array += 1  # copy-on-write in the worker
    name = getattr(array, "filename", None) or getattr(array.base, "filename", None)
    return float(array.sum()), type(array).__name__, name is not None


def test_shared_array_is_sent_by_name_and_never_copied(
    process_backend_name: str, parent_writes: list[int], stored_sizes: list[int]
) -> None:
    import gc

    source = np.arange(MiB // 4, dtype=np.float64)  # 2 MiB
    shared = shm.shared_array(source)
    assert isinstance(shared, np.memmap) and np.array_equal(shared, source)
    (path,) = [p for p in _ours() if "shared-" in p]
    with _executor(process_backend_name) as executor:
        for _ in range(3):
            got = list(executor.map(bump_and_describe, [shared, shared[8:]]))
            expected_total = float(shared.sum()) + shared.size
            assert got[0][0] == expected_total
            assert got[1][0] == float(shared[8:].sum()) + shared.size - 8
            shared += 1  # the parent's change: the next map reads it
        if _same_machine(process_backend_name):
            assert got[0][1:] == ("memmap", True)  # the workers mapped the file itself
            assert parent_writes == []  # nothing was written for any map
        else:  # workers elsewhere: the data travel, stored once per map
            assert stored_sizes and all(size <= source.nbytes for size in stored_sizes)
    assert np.array_equal(shared, source + 3)  # the workers' writes stayed theirs
    view = shared[100:]
    del shared
    gc.collect()
    assert os.path.exists(path)  # a view still maps it
    del view
    gc.collect()
    assert not os.path.exists(path)


def test_shared_array_refuses_what_it_cannot_hold() -> None:
    with pytest.raises(TypeError, match="needs data to copy, or shape="):
        shm.shared_array()
    with pytest.raises(TypeError, match="Python objects"):
        shm.shared_array(np.array([object()]))
    with pytest.raises(ValueError, match="empty"):
        shm.shared_array(shape=(0,))
    with pytest.raises(TypeError, match="not both"):
        shm.shared_array(np.zeros(3), shape=3)
    zeros = shm.shared_array(shape=(4, 5), dtype=np.int32, order="F")
    assert zeros.shape == (4, 5) and zeros.dtype == np.int32 and zeros.flags.f_contiguous
    assert int(zeros.sum()) == 0
    del zeros


def test_rebuilding_a_memmap_allocates_nothing_the_size_of_the_array(tmp_path: Path) -> None:
    """The worker maps the file: it must not build a buffer as large as the array to
    work out the layout (that doubled every worker's memory for a memmap argument)."""
    import tracemalloc

    from procession.serialization.shm import rebuild

    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)  # sparse: costs no memory or disk
    layouts = [
        ((8 * MiB,), (8,), 0),  # C and F
        ((4 * MiB, 2), (16, 8), 0),  # C
        ((2, 4 * MiB), (8, 16), 0),  # F
        ((4 * MiB,), (16,), 0),  # strided: every other element
    ]
    for shape, strides, first in layouts:
        tracemalloc.start()
        try:
            array = rebuild.memmap_from_file(
                str(path), "c", 0, 64 * MiB, np.dtype(np.float64), shape, strides, first
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < MiB, f"rebuilding {shape} allocated {peak} bytes"
        assert array.shape == shape and array.strides == strides
        assert float(array[-1].sum()) == 0.0
        del array
