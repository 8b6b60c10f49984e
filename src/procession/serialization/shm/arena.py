"""Shared-memory segments and the arenas that own them.

    parent (one Arena per map)                         worker (a Reply per task)
    ──────────────────────────                         ─────────────────────────
    dumps(items) ── pickle protocol 5 ──┐
      buffer >= threshold: write it to  │
      DIR/procession-<pid>-<nonce>-<map>-<n>   blob = MAGIC | header | payload
      (same object again: same segment) └── task ──►  load_task(blob): map each
                                                      segment copy-on-write
                                                      (MAP_PRIVATE), loads(buffers=)
    loads(result blob): map each        ◄── result ── Reply.dumps(values): buffers
      segment, unlink it at once: the                 >= threshold written to
      array now lives in that mapping                 DIR/<map prefix>r<pid>-<n>
    release(lease) when a task is done;
    close() at the end of the map: sweep DIR/<map prefix>*

Segments are plain files in ``/dev/shm`` (or the temp folder once ``/dev/shm``
is full) that this module creates, maps and unlinks itself: no
``multiprocessing.shared_memory`` and so none of ``resource_tracker``'s traps
(CPython issue 82300: a tracker that unlinks segments another process still
uses, or warns about leaks that are not).  Every name starts with the parent's
prefix, so whatever a crash leaves behind is swept by the map's ``close()``,
by the parent at exit, or, when the parent itself is killed, by the cleanup
process (:mod:`procession.serialization.shm.janitor`).

A backend whose workers may be on other machines but that can keep buffers
itself (``Capabilities.buffer_store``: Dask scatters them, Ray puts them in
its object store) gets a :class:`StoredArena` instead: the same payload
format, with the backend's keys in place of segment paths, each buffer stored
once per map and delivered by the backend with every task that names it.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import glob
import itertools
import mmap
import os
import pickle
import queue
import secrets
import struct
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from procession.serialization.serializers import Serializer

if TYPE_CHECKING:
    from procession.backends.base import Backend, StoredBuffer

__all__ = [
    "IN_BAND",
    "MAGIC",
    "NAME_PREFIX",
    "Arena",
    "InBand",
    "Reply",
    "SharedMemoryFullWarning",
    "StoredArena",
    "load_payload",
    "owner_prefix",
    "sweep_owner",
]

#: Every segment procession makes is named ``procession-<pid>-...``.
NAME_PREFIX = "procession-"
#: Marks a payload with out-of-band buffers.  A pickle starts with b"\x80", so
#: a payload from a buffer-capable serializer can never start with this.
MAGIC = b"\x00PZC"
_HEADER = struct.Struct("<I")
SHM_DIRECTORY = "/dev/shm"
# Writes go through os.write in slices: one call moves at most ~2 GiB on Linux.
_WRITE_SLICE = 1 << 30
# Content checks before reusing a segment compare this much at a time.
_COMPARE_SLICE = 1 << 22

Ref = tuple[str, int]  # (path, nbytes) of a segment


class SharedMemoryFullWarning(UserWarning):
    """``/dev/shm`` had no room: large buffers go through files in the temp folder."""


# -- per-process state: the name prefix and the cleanup process ---------------


class _Owner:
    """This process's segment names, and the cleanup process that outlives it."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.prefix = f"{NAME_PREFIX}{self.pid}-{secrets.token_hex(3)}-"
        self.maps = itertools.count()
        self.janitor: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()
        self.warned_full = False


_owner: _Owner | None = None
_owner_lock = threading.Lock()


def _reset_after_fork() -> None:
    # A forked child must not sweep (or reuse the names of) its parent's segments.
    global _owner, _owner_lock, _reaper
    _owner = None
    _owner_lock = threading.Lock()
    _reaper = None


os.register_at_fork(after_in_child=_reset_after_fork)


def _get_owner() -> _Owner:
    global _owner
    with _owner_lock:
        if _owner is None:
            _owner = _Owner()
            atexit.register(_at_exit, _owner)
        return _owner


def owner_prefix() -> str:
    """The name prefix of every segment this process owns (``procession-<pid>-<nonce>-``)."""
    return _get_owner().prefix


def _directories() -> tuple[str, str]:
    """Where segments go: ``/dev/shm`` first, the temp folder when it is full or absent."""
    return SHM_DIRECTORY, tempfile.gettempdir()


def _start_janitor(owner: _Owner) -> None:
    with owner.lock:
        if owner.janitor is not None:
            return
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "janitor.py")
        process = subprocess.Popen(
            [sys.executable, "-S", "-I", script, str(owner.pid), owner.prefix, *_directories()],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
        # The first process forks the real cleaner and exits: reap it now.
        process.wait()
        owner.janitor = process


def sweep_owner(prefix: str) -> int:
    """Delete every segment whose name starts with ``prefix``; return how many."""
    removed = 0
    for directory in dict.fromkeys(_directories()):
        pattern = os.path.join(glob.escape(directory), glob.escape(prefix) + "*")
        for path in glob.glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed += 1
    return removed


def _at_exit(owner: _Owner) -> None:
    if owner is not _owner or owner.pid != os.getpid():
        return
    sweep_owner(owner.prefix)
    if owner.janitor is not None and owner.janitor.stdin is not None:
        with contextlib.suppress(OSError):
            owner.janitor.stdin.close()


# -- segments -----------------------------------------------------------------


class _Reaper:
    """Frees unlinked segments' memory off the caller's thread.

    Unlinking a file nobody maps any more also frees its pages, which for
    100 MiB costs some 15 ms on the thread that unlinks: the end of a map.
    The name goes at once (so nothing is left in the directory); an open
    descriptor keeps the pages until this thread closes it.
    """

    def __init__(self) -> None:
        self.descriptors: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="procession-shm-reaper", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            fd = self.descriptors.get()
            with contextlib.suppress(OSError):
                os.close(fd)


_reaper: _Reaper | None = None
_reaper_lock = threading.Lock()


def unlink_soon(path: str) -> None:
    """Remove ``path``'s name now; free its memory in the background."""
    global _reaper
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except BaseException:
        os.close(fd)
        raise
    with _reaper_lock:
        if _reaper is None:
            _reaper = _Reaper()
        reaper = _reaper
    reaper.descriptors.put(fd)


def _write_all(fd: int, data: memoryview) -> None:
    written = 0
    total = len(data)
    while written < total:
        written += os.write(fd, data[written : written + _WRITE_SLICE])


def _room(directory: str) -> int:
    try:
        stat = os.statvfs(directory)
    except OSError:
        return 0
    return stat.f_bavail * stat.f_frsize


def write_segment(name: str, data: memoryview, directories: tuple[str, str]) -> str:
    """Write ``data`` (1-D bytes) to a new file ``name`` in the first directory with room."""
    return _place(name, len(data), directories, lambda fd: _write_all(fd, data))


def reserve_segment(name: str, nbytes: int, directories: tuple[str, str]) -> str:
    """A new zero-filled file ``name`` of ``nbytes``, its pages reserved now (writing
    through a map of a file whose filesystem fills up later would be a SIGBUS)."""
    return _place(name, nbytes, directories, lambda fd: os.posix_fallocate(fd, 0, nbytes))


def _place(
    name: str, nbytes: int, directories: tuple[str, str], fill: Callable[[int], None]
) -> str:
    """Create ``name`` in ``/dev/shm``, or the temp folder once that is full, and ``fill`` it."""
    shm, fallback = directories
    candidates = [shm, fallback] if os.path.isdir(shm) else [fallback]
    for directory in candidates:
        if directory == shm and _room(shm) < nbytes:
            _warn_full(nbytes, fallback)
            continue
        path = os.path.join(directory, name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fill(fd)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            if directory == shm and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                _warn_full(nbytes, fallback)
                continue  # filled up meanwhile: try the temp folder
            raise
        os.close(fd)
        return path
    raise OSError(errno.ENOSPC, f"no room for a {nbytes}-byte segment in {' or '.join(candidates)}")


def _warn_full(nbytes: int, fallback: str) -> None:
    owner = _get_owner()
    if owner.warned_full:
        return
    owner.warned_full = True
    warnings.warn(
        f"{SHM_DIRECTORY} has no room for a {nbytes}-byte buffer; large buffers now go "
        f"through files in {fallback} (slower). Free space in {SHM_DIRECTORY}, enlarge it "
        f"(e.g. docker run --shm-size=4g), or raise the threshold with "
        f"procession.serialization.shm.large_buffers(threshold=...)",
        SharedMemoryFullWarning,
        stacklevel=4,
    )


def map_segment(path: str, nbytes: int, *, private: bool) -> mmap.mmap:
    """Map a segment: copy-on-write (``private``) for arguments, shared for results."""
    if private:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        flags, prot = mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE
    else:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        # Prefaulting a shared mapping costs one call, not a fault per page.
        flags, prot = (
            mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
            mmap.PROT_READ | (mmap.PROT_WRITE),
        )
    try:
        # MAP_POPULATE is not used for private maps: it would break copy-on-write
        # up front, copying every page.
        return mmap.mmap(fd, nbytes, flags=flags, prot=prot)
    finally:
        os.close(fd)


# -- the payload format ---------------------------------------------------------


ReplyTo = tuple[str, tuple[str, str], int]  # (map prefix, directories, threshold)


def _header(reply: ReplyTo | None, refs: list[Ref], stored: bool = False) -> bytes:
    # ``stored``: the refs name buffers the backend keeps (their keys), not segment files.
    header = pickle.dumps((reply, refs, stored), 5)
    return MAGIC + _HEADER.pack(len(header)) + header


def _pack(
    reply: ReplyTo | None,
    refs: list[Ref],
    payload: bytes,
    empty: bytes | None = None,
    stored: bool = False,
) -> bytes:
    # ``empty``: the header for no refs, made once per map (small tasks pay nothing more).
    header = empty if (empty is not None and not refs) else _header(reply, refs, stored)
    return header + payload


def _unpack(data: bytes) -> tuple[ReplyTo | None, list[Ref], bool, memoryview]:
    view = memoryview(data)
    (size,) = _HEADER.unpack_from(view, len(MAGIC))
    start = len(MAGIC) + _HEADER.size
    reply, refs, stored = pickle.loads(view[start : start + size])
    return reply, refs, stored, view[start + size :]


def has_buffers(data: bytes) -> bool:
    """Whether ``data`` was made by an arena (and may name shared-memory segments)."""
    return data[:4] == MAGIC


# -- serializing with out-of-band buffers --------------------------------------


class _Collector:
    """The ``buffer_callback``: which buffers leave the byte stream."""

    def __init__(self, threshold: int, *, memmaps_by_name: bool = True) -> None:
        self.threshold = threshold
        # False when workers may be on other machines: a file name means nothing there.
        self.memmaps_by_name = memmaps_by_name
        self.large: list[pickle.PickleBuffer] = []
        self.files: list[tuple[str, int, int]] = []

    def __call__(self, buffer: pickle.PickleBuffer) -> bool:
        # Returning True keeps a buffer in-band.
        if buffer.raw().nbytes < self.threshold:
            return True
        self.large.append(buffer)
        return False

    def note_file(self, filename: str, start: int, nbytes: int) -> None:
        """A ``numpy.memmap`` is sent by file name: nothing to write, only to report."""
        self.files.append((filename, start, nbytes))


def out_of_band_parts(
    serializer: Serializer, obj: Any, threshold: int
) -> tuple[list[pickle.PickleBuffer], list[tuple[str, int, int]], int]:
    """What serializing ``obj`` would send out of band: (buffers, memmap files, in-band size)."""
    collector = _Collector(threshold)
    payload = _oob_dumps(serializer, obj, collector)
    return collector.large, collector.files, len(payload)


def _oob_dumps(serializer: Serializer, obj: Any, collector: _Collector) -> bytes:
    dumps: Any = serializer.dumps  # the built-ins take buffer_callback=
    payload: bytes = dumps(obj, buffer_callback=collector)
    if len(payload) >= collector.threshold:
        # The C pickler never asks reducer_override about exact bytes and bytearray
        # objects, so they stay in-band; wrap those in plain containers and re-dump.
        wrapped, changed = _wrap_large_bytes(obj, collector.threshold, depth=4)
        if changed:
            collector.large.clear()
            collector.files.clear()
            payload = dumps(wrapped, buffer_callback=collector)
    return payload


class _LargeBytes:
    """A ``bytes`` or ``bytearray`` that pickles with its buffer out of band."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> Any:
        # bytes(buffer) / bytearray(buffer): one copy out of the mapping, as they own memory.
        return (type(self.data), (pickle.PickleBuffer(self.data),))


def _wrap_large_bytes(obj: Any, threshold: int, depth: int) -> tuple[Any, bool]:
    cls = type(obj)
    if cls is bytes or cls is bytearray:
        return (_LargeBytes(obj), True) if len(obj) >= threshold else (obj, False)
    if depth == 0:
        return obj, False
    if cls is list or cls is tuple:
        parts = [_wrap_large_bytes(part, threshold, depth - 1) for part in obj]
        if not any(changed for _, changed in parts):
            return obj, False
        values = [value for value, _ in parts]
        return (values if cls is list else tuple(values)), True
    if cls is dict:
        items = {key: _wrap_large_bytes(value, threshold, depth - 1) for key, value in obj.items()}
        if not any(changed for _, changed in items.values()):
            return obj, False
        return {key: value for key, (value, _) in items.items()}, True
    return obj, False


def _address(view: memoryview) -> int | None:
    numpy = sys.modules.get("numpy")
    if numpy is None:
        return None
    address: int = numpy.frombuffer(view, dtype=numpy.uint8).__array_interface__["data"][0]
    return address


def _same_content(a: memoryview, b: Any) -> bool:
    numpy = sys.modules.get("numpy")
    view_b = memoryview(b).cast("B")
    try:
        if numpy is not None:
            # Word-wide compares in cache-sized slices run at memory speed.
            word = numpy.uint64 if len(a) % 8 == 0 else numpy.uint8
            left = numpy.frombuffer(a, dtype=word)
            right = numpy.frombuffer(view_b, dtype=word)
            step = _COMPARE_SLICE // left.itemsize
            try:
                return all(
                    numpy.array_equal(left[i : i + step], right[i : i + step])
                    for i in range(0, len(left), step)
                )
            finally:
                del left, right
        for start in range(0, len(a), _COMPARE_SLICE):
            stop = start + _COMPARE_SLICE
            # bytes == bytes is a memcmp; memoryview == memoryview compares item by item.
            if a[start:stop].tobytes() != view_b[start:stop].tobytes():
                return False
        return True
    finally:
        view_b.release()


@dataclass(eq=False)
class _Segment:
    """One large buffer as it travels: a file in ``/dev/shm``, or a buffer the backend stores."""

    where: str  # the segment's path, or the stored buffer's key
    nbytes: int
    exporter: Any  # kept alive so its memory (the cache key) cannot be reused
    users: int = 0
    pinned: bool = False
    # The parent's own read-only map, made on the first reuse to check the contents.
    view: mmap.mmap | None = None
    # A backend's store: its handle (``stored.data`` is the parent's copy).
    stored: StoredBuffer | None = None


@dataclass
class Lease:
    """The segments one task uses; released when the task is done."""

    segments: list[_Segment] = field(default_factory=list)


class InBand:
    """No shared memory: the serializer's bytes as they are (threads, remote backends)."""

    active = False

    def dumps(self, serializer: Serializer, obj: Any, *, pin: bool = False) -> bytes:
        return serializer.dumps(obj)

    def dumps_leased(self, serializer: Serializer, obj: Any) -> tuple[bytes, Lease | None]:
        return serializer.dumps(obj), None

    def loads(self, serializer: Serializer, data: bytes) -> Any:
        return serializer.loads(data)

    def release(self, lease: Lease | None) -> None:
        pass

    def attachments(self, lease: Lease | None) -> list[StoredBuffer]:
        """The stored buffers a task needs: its items' (``lease``) and its function's."""
        return []

    def close(self, unfinished: Iterable[Future[Any]] = ()) -> None:
        pass


IN_BAND = InBand()


class Arena(InBand):
    """The parent's side of one map: writes large argument buffers, adopts large results.

    ``stable_source``: the map's items come from a list or tuple made before the
    map began, so an object met again is the one met before and its contents
    are not checked again (see :meth:`_segment_for`).

    Example::

        arena = Arena(threshold=1 << 20)
        try:
            blob, lease = arena.dumps_leased(serializer, items)   # send blob to a worker
            values = arena.loads(serializer, result_blob)         # its results, zero-copy
            arena.release(lease)
        finally:
            arena.close()
    """

    active = True
    #: Where task payloads say their buffers are: segment files (False) or a backend's store.
    stored = False

    def __init__(self, threshold: int, *, stable_source: bool = False) -> None:
        owner = _get_owner()
        if owner.janitor is None and not self.stored:
            _start_janitor(owner)
        self.threshold = threshold
        self.stable_source = stable_source
        self.prefix = f"{owner.prefix}{next(owner.maps)}-"
        self.directories = _directories()
        self._reply: ReplyTo | None = (
            None
            if self.stored
            else (
                self.prefix,
                self.directories,
                threshold,
            )
        )
        self._empty_header = _header(self._reply, [], self.stored)
        self._count = itertools.count()
        self._lock = threading.Lock()
        # (address, nbytes) -> segment, so the same array is written once per map.
        self._by_address: dict[tuple[int, int], _Segment] = {}
        # Segments of dumps(pin=True) (the map's function): every task needs them.
        self._pinned: list[_Segment] = []
        self._closed = False

    def dumps(self, serializer: Serializer, obj: Any, *, pin: bool = False) -> bytes:
        """Serialize ``obj``; with ``pin`` its segments live until :meth:`close`."""
        data, lease = self.dumps_leased(serializer, obj)
        if lease is None:
            return data
        if not lease.segments:
            # Plain serializer bytes: the same function pickles to the same bytes (and
            # digest) in every map, so workers and the chunker recognise it.
            return data[len(self._empty_header) :]
        if pin:
            for segment in lease.segments:
                segment.pinned = True
            self._pinned.extend(lease.segments)
        return data

    def dumps_leased(self, serializer: Serializer, obj: Any) -> tuple[bytes, Lease | None]:
        """Serialize ``obj``; large buffers go to segments held until ``release(lease)``."""
        if not serializer.supports_buffers:
            return serializer.dumps(obj), None
        collector = _Collector(self.threshold, memmaps_by_name=not self.stored)
        payload = _oob_dumps(serializer, obj, collector)
        lease = Lease()
        try:
            for buffer in collector.large:
                lease.segments.append(self._segment_for(buffer))
        except BaseException:
            self.release(lease)
            raise
        refs = [(segment.where, segment.nbytes) for segment in lease.segments]
        return _pack(self._reply, refs, payload, self._empty_header, self.stored), lease

    def _segment_for(self, buffer: pickle.PickleBuffer) -> _Segment:
        raw = buffer.raw()
        exporter = raw.obj
        address = _address(raw)
        key = (address, raw.nbytes) if address is not None else None
        with self._lock:
            if self._closed:
                raise RuntimeError("this map has finished: its shared-memory arena is closed")
            found = self._by_address.get(key) if key is not None else None
            # Same memory is not same content: a generator may change an array in
            # place between items (a reused buffer); bytes cannot change, and items
            # of a list made before the map are what they were (changing them while
            # the map runs is the caller's race, as with any pool).
            if found is not None and (
                self.stable_source or type(exporter) is bytes or self._unchanged(raw, found)
            ):
                found.users += 1
                # Sent more than once: likely again, so keep it for the rest of the map
                # rather than rewrite it whenever the in-flight window drains.
                found.pinned = True
                return found
            name = f"{self.prefix}{next(self._count)}"
        segment = self._create(name, raw, exporter)
        with self._lock:
            if key is not None:
                self._by_address[key] = segment
        return segment

    def _create(self, name: str, raw: memoryview, exporter: Any) -> _Segment:
        path = write_segment(name, raw, self.directories)
        return _Segment(path, raw.nbytes, exporter, users=1)

    def _unchanged(self, raw: memoryview, segment: _Segment) -> bool:
        if segment.view is None:
            fd = os.open(segment.where, os.O_RDONLY | os.O_CLOEXEC)
            try:
                # Shared and prefaulted: later checks of the same segment read at memory speed.
                flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
                segment.view = mmap.mmap(fd, segment.nbytes, flags=flags, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
        return _same_content(raw, segment.view)

    def release(self, lease: Lease | None) -> None:
        """A task is done with its segments: unlink those no other task needs."""
        if lease is None:
            return
        with self._lock:
            dropped = []
            for segment in lease.segments:
                segment.users -= 1
                if segment.users <= 0 and not segment.pinned:
                    self._forget(segment)
                    dropped.append(segment)
            lease.segments.clear()
        self._remove(dropped)

    def _forget(self, segment: _Segment) -> None:
        for key, known in list(self._by_address.items()):
            if known is segment:
                del self._by_address[key]

    def _remove(self, segments: list[_Segment]) -> None:
        for segment in segments:
            _close_view(segment)
            unlink_soon(segment.where)

    def loads(self, serializer: Serializer, data: bytes) -> Any:
        """Load a worker's results; their large buffers become arrays over shared memory."""
        return load_payload(serializer, data, private=False)[0]

    def close(self, unfinished: Iterable[Future[Any]] = ()) -> None:
        """Remove every segment of this map, the parent's and any a worker left.

        A task in ``unfinished`` (running, so it could not be cancelled) may
        still write its results: sweep again when it ends.
        """
        with self._lock:
            self._closed = True
            known = list(self._by_address.values())
            self._by_address.clear()
        self._remove(known)
        sweep_owner(self.prefix)  # what a task left, and segments of leases never released
        for future in unfinished:
            if not future.done():
                future.add_done_callback(self._sweep_late)

    def _sweep_late(self, _: Future[Any]) -> None:
        sweep_owner(self.prefix)


class StoredArena(Arena):
    """An arena for a backend that keeps buffers itself (``Capabilities.buffer_store``).

    Each large argument buffer is handed to ``backend.store_buffer`` once per
    map (Dask scatters it, Ray puts it in its object store); tasks name it by
    key and the backend delivers it with them.  Results come back in-band.
    The parent keeps one copy of each stored buffer for the life of the map:
    to check an object sent again, and so a backend can store it again if a
    worker that held it was lost.

    Example::

        arena = StoredArena(1 << 20, backend)
        blob, lease = arena.dumps_leased(serializer, items)
        backend.submit_with_buffers(task_with(blob), arena.attachments(lease))
    """

    stored = True

    def __init__(self, threshold: int, store: Backend, *, stable_source: bool = False) -> None:
        super().__init__(threshold, stable_source=stable_source)
        self._store = store
        self._live: dict[int, _Segment] = {}

    def _create(self, name: str, raw: memoryview, exporter: Any) -> _Segment:
        # A copy: the backend may keep it past this call, and the caller may
        # change its array once the map has read it.
        stored = self._store.store_buffer(raw.tobytes())
        segment = _Segment(stored.key, raw.nbytes, exporter, users=1, stored=stored)
        with self._lock:
            closed = self._closed
            if not closed:
                self._live[id(segment)] = segment
        if closed:  # the map ended while this buffer was being stored
            self._remove([segment])
            raise RuntimeError("this map has finished: its buffer store is closed")
        return segment

    def _unchanged(self, raw: memoryview, segment: _Segment) -> bool:
        assert segment.stored is not None
        return _same_content(raw, segment.stored.data)

    def _remove(self, segments: list[_Segment]) -> None:
        stored = []
        with self._lock:
            for segment in segments:
                self._live.pop(id(segment), None)
                if segment.stored is not None:
                    stored.append(segment.stored)
        if stored:
            self._store.drop_buffers(stored)

    def loads(self, serializer: Serializer, data: bytes) -> Any:
        return serializer.loads(data)

    def attachments(self, lease: Lease | None) -> list[StoredBuffer]:
        segments = self._pinned + (lease.segments if lease is not None else [])
        return list({id(s): s.stored for s in segments if s.stored is not None}.values())

    def close(self, unfinished: Iterable[Future[Any]] = ()) -> None:
        """Drop every buffer this map stored (tasks still running keep theirs:
        a backend delivers a task's buffers before it starts)."""
        with self._lock:
            self._closed = True
            self._by_address.clear()
            live = list(self._live.values())
        self._remove(live)


def _close_view(segment: _Segment) -> None:
    if segment.view is not None:
        with contextlib.suppress(BufferError):
            segment.view.close()
        segment.view = None


# -- the worker's side --------------------------------------------------------


class Reply(InBand):
    """How a worker sends a task's results: large buffers to segments under the map's prefix."""

    active = True

    def __init__(self, prefix: str, directories: tuple[str, str], threshold: int) -> None:
        self.prefix = f"{prefix}r{os.getpid()}-"
        self.directories = directories
        self.threshold = threshold

    def dumps(self, serializer: Serializer, obj: Any, *, pin: bool = False) -> bytes:
        collector = _Collector(self.threshold)
        payload = _oob_dumps(serializer, obj, collector)
        refs: list[Ref] = []
        try:
            for buffer in collector.large:
                raw = buffer.raw()
                name = f"{self.prefix}{secrets.token_hex(4)}"
                refs.append((write_segment(name, raw, self.directories), raw.nbytes))
        except BaseException:
            for path, _ in refs:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            raise
        if not refs:
            return payload  # nothing out of band: the parent reads plain serializer bytes
        return _pack(None, refs, payload)


def load_payload(
    serializer: Serializer,
    data: bytes,
    *,
    private: bool,
    attachments: Mapping[str, Any] | None = None,
) -> tuple[Any, InBand]:
    """Load ``data``; also return how to send results back (a :class:`Reply` or in-band).

    ``private``: map segments copy-on-write and leave them (the parent owns
    them); otherwise map them shared and unlink them at once (results: the
    parent now owns the memory, and it is freed with the last array using it).
    ``attachments``: the stored buffers the backend delivered with this task,
    by key; each task gets its own writable copy, as if they had been pickled.
    """
    if not (serializer.supports_buffers and has_buffers(data)):
        return serializer.loads(data), IN_BAND
    reply, refs, stored, payload = _unpack(data)
    buffers: list[Any] = []
    if stored:
        for key, nbytes in refs:
            buffers.append(_attached(attachments, key, nbytes))
    else:
        try:
            for path, nbytes in refs:
                buffers.append(map_segment(path, nbytes, private=private))
        finally:
            if not private:
                for path, _ in refs:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
    loads: Any = serializer.loads
    obj = loads(payload, buffers=buffers)
    return obj, (Reply(*reply) if reply is not None else IN_BAND)


def _attached(attachments: Mapping[str, Any] | None, key: str, nbytes: int) -> bytearray:
    if attachments is None or key not in attachments:
        raise RuntimeError(
            f"this task needs the stored buffer {key!r} ({nbytes} bytes), but its backend did "
            "not deliver it: a backend with Capabilities(buffer_store=True) must pass the "
            "buffers of submit_with_buffers() to procession.worker.run_task(task, buffers)"
        )
    copy = bytearray(memoryview(attachments[key]).cast("B"))
    if len(copy) != nbytes:
        raise RuntimeError(
            f"the stored buffer {key!r} arrived with {len(copy)} bytes, not {nbytes}: "
            "the backend delivered the wrong object"
        )
    return copy


def segment_names(prefix: str | None = None) -> Iterator[str]:
    """Paths of live segments whose names start with ``prefix`` (default: every procession one)."""
    start = prefix or NAME_PREFIX
    for directory in dict.fromkeys(_directories()):
        yield from glob.glob(os.path.join(glob.escape(directory), glob.escape(start) + "*"))
