"""New ``bytes`` objects filled in place by the kernel (a socket's ``recv_into``, a file's
``preadv``), without zeroing them first.

``bytearray(n)`` writes *n* zero bytes before the kernel overwrites them all: a memset, and a page
fault per fresh page, ~12% of the mount's CPU in a cold load and ~8% in a warm one here
(docs/adr/0020).  :func:`unfilled` does what C code does with ``PyBytes_FromStringAndSize(NULL,
n)``: the object is written through a view of its storage before anyone else sees it, and the
caller hands out the ``bytes`` (immutable from then on) — also what every reader of a chunk
expects.
"""

from __future__ import annotations

import ctypes
import os

from . import config

_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_bytes_address = ctypes.pythonapi.PyBytes_AsString
_bytes_address.restype = ctypes.c_void_p
_bytes_address.argtypes = (ctypes.py_object,)


def unfilled(n: int) -> tuple[bytes, memoryview, int]:
    """A new ``bytes`` of *n* bytes (*n* ≥ 2), not yet filled; a writable view of its storage,
    to be released before the object is handed out; and the storage's address.  Until every
    byte is written the object holds whatever malloc left there, so the caller must fill it or
    drop it."""
    if n < 2:  # CPython shares its empty and one-byte objects
        raise ValueError("unfilled() needs at least 2 bytes")
    obj = _new_bytes(None, n)
    address = _bytes_address(obj)
    return obj, memoryview((ctypes.c_char * n).from_address(address)).cast("B"), address


#: malloc arenas (heaps) a process's threads share; see reuse_freed_memory.
MALLOC_ARENAS = 2


def reuse_freed_memory() -> None:
    """Let malloc hand freed chunk buffers out again instead of mapping fresh memory each time.

    glibc serves blocks above its mmap threshold with a new mapping, and every 4 KiB page of a new
    mapping is a page fault and a zeroed page: measured here, 0.3 s of kernel CPU per GiB of chunks
    loaded (docs/adr/0008).  A fixed threshold above the largest chunk (64 MiB) keeps chunk buffers in
    malloc's heaps, and a 128 MiB trim threshold stops the heap from being handed back and faulted
    in again between chunks.

    Every heap keeps up to that much freed, though, and glibc gives threads heaps (arenas) of
    their own, up to 8 per core: a ``--memory 64M`` mount loading a model ten times its cache
    peaked at ~300 MiB RSS.  Two arenas (unless ``MALLOC_ARENA_MAX`` says otherwise) measured
    ~180 MiB (docs/adr/0018).  No-op where mallopt is missing (not glibc).

    For every process that fetches and decodes chunks: the mount's daemon, ``mlfs export`` and
    ``mlfs serve``.  Without it, ``mlfs export`` of a 555 MiB model faulted in ~650 MiB of fresh
    pages to verify and decode it (docs/adr/0031).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return
    mallopt(-3, config.MAX_CHUNK_SIZE)  # M_MMAP_THRESHOLD
    mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD
    if "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(-8, MALLOC_ARENAS)  # M_ARENA_MAX


# -- huge-page regions for O_DIRECT reads (docs/adr/0025) ------------------------------------------
#
# An O_DIRECT read goes to the disk in requests of at most 254 segments here (virtio's
# max_segments).  Into ordinary 4 KiB pages a 1 MiB read is cut in two requests, and this disk reads
# chunk files at ~1.0 GB/s; into memory backed by 2 MiB transparent huge pages a segment is 2 MiB
# and the same files come at 1.35-1.7 GB/s, faster than read-ahead over the model file itself
# (writes: 1.34 against 0.99 GB/s).  Fresh memory is dear here (the first touch of a region costs
# more than the read into it), so regions are kept in a small pool and handed out again when the
# last view of one is gone.
#
# Dearest of all is a fresh huge page: this VM's balloon device reports free 2 MiB blocks to the
# host (virtio free page reporting), which takes them back, so the first touch of one waits for the
# host: ~5 ms per huge page measured, against ~0.25 ms for one the guest still holds.  A new mount
# paid that for each of the ~10 regions its first warm load kept in flight, ~10% of its CPU in
# that load; a mount now faults a few in (:func:`prefault`) while the loader is still starting.

import mmap as _mmap
import threading as _threading

HUGE = 2 << 20
#: Regions are sized in steps of this.  The whole huge pages from a region's start are huge, the
#: rest ordinary pages: a 4 MiB chunk with its seal takes two huge pages and 64 small ones, not a
#: third huge page, and a region is never more than a step larger than asked for.
STEP = 256 << 10
#: Reads smaller than this get ordinary memory (:func:`unfilled`): they would get no huge page.
HUGE_MIN = HUGE
#: Free regions kept for reuse, in bytes; more are unmapped.
POOL_BYTES = 32 << 20
#: A free region up to this many times the size asked for is handed out rather than a new one
#: mapped (a 3 MiB chunk gets a free 4 MiB chunk's region).
FIT = 1.5
#: ``MLFS_HUGE_PAGES=0``: chunk files are read and written through ordinary memory, as before
#: docs/adr/0025 (for comparisons).
HUGE_PAGES = os.environ.get("MLFS_HUGE_PAGES") != "0"

_libc = ctypes.CDLL(None, use_errno=True)
_c_mmap = _libc.mmap
_c_mmap.restype = ctypes.c_void_p
_c_mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                    ctypes.c_long)
_c_munmap = _libc.munmap
_c_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_c_madvise = _libc.madvise
_c_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_MAP_FAILED = ctypes.c_void_p(-1).value
_MADV_HUGEPAGE = getattr(_mmap, "MADV_HUGEPAGE", 14)


def _capacity(n: int) -> int:
    return -(-n // STEP) * STEP


def _map(capacity: int) -> int | None:
    """*capacity* bytes of anonymous memory starting on a huge-page boundary, advised to use huge
    pages; None if the kernel gives no memory."""
    span = capacity + HUGE
    p = _c_mmap(None, span, _mmap.PROT_READ | _mmap.PROT_WRITE,
                _mmap.MAP_PRIVATE | _mmap.MAP_ANONYMOUS, -1, 0)
    if p is None or p == _MAP_FAILED:
        return None
    start = -(-p // HUGE) * HUGE
    if start > p:
        _c_munmap(p, start - p)
    if p + span > start + capacity:
        _c_munmap(start + capacity, p + span - start - capacity)
    _c_madvise(start, capacity, _MADV_HUGEPAGE)  # a kernel without THP keeps small pages: fine
    return start


class _Lease:
    """Gives its region back to the pool when the last view of it is gone (CPython frees the
    views' exporter, and with it this object, as soon as its last reference goes)."""

    __slots__ = ("address", "capacity")

    def __init__(self, address: int, capacity: int) -> None:
        self.address, self.capacity = address, capacity

    def __del__(self) -> None:
        pool = _pool
        if pool is not None:  # None only while the interpreter shuts down
            pool.give_back(self.address, self.capacity)


class _Pool:
    """Free regions by capacity, at most :data:`POOL_BYTES` of them; the longest unused go first."""

    def __init__(self) -> None:
        self._lock = _threading.Lock()
        self._free: dict[tuple[int, int], None] = {}  # (capacity, address), oldest first
        self.free_bytes = 0
        self.mapped = 0  # regions mapped so far (for tests and benchmarks)

    def take(self, capacity: int) -> tuple[int, int] | None:
        """``(address, capacity)`` of a region of at least *capacity* bytes: a free one of that
        size, else the smallest free one up to :data:`FIT` times as large, else a new one; None
        if the kernel gives no memory."""
        with self._lock:
            best = None
            for key in reversed(self._free):  # the most recently used first: its pages are warm
                if key[0] == capacity:
                    best = key
                    break
                if capacity < key[0] <= capacity * FIT and (best is None or key[0] < best[0]):
                    best = key
            if best is not None:
                del self._free[best]
                self.free_bytes -= best[0]
                return best[1], best[0]
        address = _map(capacity)
        if address is None:
            return None
        self.mapped += 1
        return address, capacity

    def release_free(self) -> None:
        """Unmap every free region (tests start from an empty pool with it)."""
        with self._lock:
            free, self._free, self.free_bytes = list(self._free), {}, 0
        for size, where in free:
            _c_munmap(where, size)

    def prefault(self, count: int, capacity: int) -> int:
        """Map *count* regions of *capacity* bytes, touch every page and keep them free, as far
        as :data:`POOL_BYTES` allows; return how many were added."""
        added = 0
        for _ in range(count):
            with self._lock:
                if self.free_bytes + capacity > POOL_BYTES:
                    break
            address = _map(capacity)
            if address is None:
                break
            self.mapped += 1
            ctypes.memset(address, 0, capacity)  # the first touch: huge pages faulted in now
            self.give_back(address, capacity)
            added += 1
        return added

    def give_back(self, address: int, capacity: int) -> None:
        unmap = []
        with self._lock:
            while self._free and self.free_bytes + capacity > POOL_BYTES:
                old = next(iter(self._free))
                del self._free[old]
                self.free_bytes -= old[0]
                unmap.append(old)
            if capacity <= POOL_BYTES:
                self._free[(capacity, address)] = None
                self.free_bytes += capacity
            else:
                unmap.append((capacity, address))
        for size, where in unmap:
            _c_munmap(where, size)


_pool = _Pool()


#: Regions :func:`prefault` adds to the pool: about what a warm stream keeps in flight
#: (``MLFS_HUGE_PREFAULT`` sets it; 0 for none).
PREFAULT = int(os.environ.get("MLFS_HUGE_PREFAULT", "6"))


def prefault(n: int, count: int = PREFAULT) -> int:
    """Fault in *count* regions for reads of *n* bytes ahead of their use, as far as the pool's
    bound allows; return how many were added.  Blocks for a few ms per region: call it from a
    worker thread."""
    if not HUGE_PAGES or n < HUGE_MIN or count <= 0:
        return 0
    return _pool.prefault(count, _capacity(n))


def huge(n: int) -> memoryview | None:
    """A writable view of at least *n* bytes (*n* ≥ :data:`HUGE_MIN`) in memory backed by huge
    pages where the kernel has them, starting on a huge-page boundary; None if no memory could be
    mapped.  Its bytes are whatever the region's last user left there, so the caller fills them
    before anyone else sees them.  The region goes back to the pool when every view of it (slices
    and read-only views included) is gone."""
    if not HUGE_PAGES:
        return None
    got = _pool.take(_capacity(n))
    if got is None:
        return None
    address, capacity = got
    array = (ctypes.c_char * capacity).from_address(address)
    array._lease = _Lease(address, capacity)  # lives exactly as long as the array
    return memoryview(array).cast("B")
