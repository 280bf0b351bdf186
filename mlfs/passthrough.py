"""Opens the kernel serves from a whole copy of the file: FUSE passthrough (docs/adr/0035).

A file the mount has served whole has all its chunks in the disk cache.  In the background the
mount then writes a **whole copy** of it into the cache (``files/<blake3>``), from the chunk
files, each checked by its seal, and the copy checked against the manifest's blake3 of the whole
file before it is admitted.  A file streamed in whole from the store has its copy written as its
chunks arrive instead, in place of their chunk files (ChunkCache.begin_assembly, docs/adr/0039):
after the load, only what it lacks is written and the whole is read back and checked.  The copy
counts against ``--cache-size`` like a chunk and is evicted by the same LRU, never in favour of
its own chunks.

Later opens of that file are answered with ``FOPEN_PASSTHROUGH``: the kernel reads, and maps, the
copy itself, in its own page cache (large folios on ext4), and the daemon sees no reads at all.
A warm or hot load is then a load from the local disk.  libfuse 3.14 cannot ask for this; the
hook in ``mlfs/_passthrough.c`` adds it to the two replies that need it.

The kernel refuses an open that would mix the two ways on one inode (an inode with files open
through its FUSE page cache cannot take a passthrough open, nor the reverse), so :class:`Routes`
keeps each inode on one way while any file of it is open.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import math
import os
import struct
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import blake3

from .directio import pwrite_all

log = logging.getLogger("mlfs.passthrough")

try:
    from . import _passthrough as _hook
except ImportError:  # built without a compiler: no passthrough
    _hook = None

#: ``MLFS_PASSTHROUGH=0`` turns it off (no hook, no whole copies), as ``--no-passthrough`` does.
ENABLED = os.environ.get("MLFS_PASSTHROUGH", "1") != "0"
#: Smaller files are not copied whole: their loads are short either way.
MIN_SIZE = 4 << 20
# linux/fuse.h: _IOW(229, 1, struct fuse_backing_map) and _IOW(229, 2, uint32_t).
BACKING_OPEN = 0x4010E501
BACKING_CLOSE = 0x4004E502


class Kernel:
    """This session's passthrough: the hook in libfuse and the backing files registered."""

    def __init__(self, fuse_fd: int | None, want: bool = True) -> None:
        self.fd = fuse_fd
        self.stopped: str | None = None  # why no more opens are passed through
        self._last_unique = 0
        if not want or not ENABLED:
            self.stopped = "turned off"
        elif os.geteuid() != 0:  # backing files need CAP_SYS_ADMIN: do not ask the kernel
            self.stopped = "needs root"
        elif _hook is None:
            self.stopped = "mlfs._passthrough is not built"
        elif fuse_fd is None:
            self.stopped = "the session's /dev/fuse descriptor is not known"
        else:
            # Before the session reads INIT: the reply to it must say FUSE_PASSTHROUGH.
            if _hook.install(fuse_fd, True) != 2:  # both of libfuse's read and writev, or none
                self.stopped = "libfuse's read and writev could not be hooked"

    @property
    def active(self) -> bool:
        return self.stopped is None and _hook.state()["negotiated"]

    def describe(self) -> str:
        if self.stopped:
            return f"off: {self.stopped}"
        state = _hook.state()
        if state["negotiated"]:
            return "on"
        return "off: the kernel did not offer it" if not state["offered"] else "off"

    def stop(self, why: str) -> None:
        if self.stopped is None:
            log.warning("passthrough off for this mount: %s", why)
            self.stopped = why

    def open_unique(self) -> int | None:
        """The kernel's id of the OPEN being answered: called first thing in the open handler
        (pyfuse3 runs it before it reads another request).  None, and passthrough stopped, if
        the hook missed a request: an id must grow from one open to the next."""
        unique = _hook.last_open()
        if unique <= self._last_unique:
            self.stop("an OPEN request was not seen by the hook")
            return None
        self._last_unique = unique
        return unique

    def register(self, path: os.PathLike[str] | str, size: int) -> int:
        """Register *path* (which must be *size* bytes) as a backing file; its id."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size != size:
                raise OSError(errno.EINVAL, f"{path} is not {size} bytes")
            return fcntl.ioctl(self.fd, BACKING_OPEN, bytearray(struct.pack("iIQ", fd, 0, 0)))
        finally:
            os.close(fd)

    def unregister(self, backing: int) -> None:
        try:
            fcntl.ioctl(self.fd, BACKING_CLOSE, bytearray(struct.pack("I", backing)))
        except OSError as e:  # the session is gone: so are its backing files
            log.debug("closing backing file %d: %s", backing, e)

    @staticmethod
    def expect(unique: int, fh: int, backing: int) -> None:
        """Answer OPEN *unique* (file handle *fh*) with passthrough to *backing*."""
        _hook.expect(unique, fh, backing)


class Routes:
    """Which way the open files of each inode go: through the daemon (the FUSE page cache) or
    passed through to a backing file.  An inode takes new opens the way its open files go, and
    either way once none is open; all its passthrough opens share one backing id (the kernel
    refuses another backing file for an inode in passthrough)."""

    def __init__(self) -> None:
        self._through: dict[int, int] = {}  # inode -> files open through the daemon
        self._direct: dict[int, list[int]] = {}  # inode -> [backing id, files passed through]

    def through_daemon(self, inode: int) -> bool:
        return inode in self._through

    def backing(self, inode: int) -> int | None:
        d = self._direct.get(inode)
        return d[0] if d else None

    def open(self, inode: int, backing: int | None) -> None:
        """Count an open of *inode*, passed through to *backing* or (None) through the daemon."""
        if backing is None:
            if inode in self._direct:
                raise ValueError(f"inode {inode} is passed through")
            self._through[inode] = self._through.get(inode, 0) + 1
            return
        if inode in self._through:
            raise ValueError(f"inode {inode} is open through the daemon")
        d = self._direct.setdefault(inode, [backing, 0])
        if d[0] != backing:
            raise ValueError(f"inode {inode} is passed through to backing file {d[0]}")
        d[1] += 1

    def close(self, inode: int, direct: bool) -> int | None:
        """Count a release; the backing id to close once its inode's last such file is gone."""
        if not direct:
            left = self._through.get(inode, 0) - 1
            if left > 0:
                self._through[inode] = left
            else:
                self._through.pop(inode, None)
            return None
        d = self._direct.get(inode)
        if d is None:
            return None
        d[1] -= 1
        if d[1] > 0:
            return None
        del self._direct[inode]
        return d[0]


#: make_whole reads chunk files this many at a time, at most READ_AHEAD ahead of the one it writes.
READERS = 3
READ_AHEAD = 6


def make_whole(cache, entry, deadline: float = math.inf) -> str:
    """In a worker thread: write the whole copy of *entry* from its cached chunks, check it and
    admit it (ChunkCache.put_whole).  Where the copy was begun as the file streamed in
    (ChunkCache.begin_assembly, docs/adr/0039), only the chunks it lacks are written; it is
    given up (its chunks kept as chunk files) if it cannot be admitted.  Returns what happened:
    ``made``, ``exists``, ``partial`` (a chunk is not cached, or was found damaged: it is
    fetched again when read), ``no room`` (only its own chunks could make room), ``damaged``
    (the bytes are not the manifest's blake3), ``untrusted`` (others can write the cache),
    ``abandoned`` (``time.monotonic()`` passed *deadline*: the mount is ending) or
    ``failed: <why>`` (the disk)."""
    asm = cache.assembly(entry.blake3)
    if asm is not None:
        asm.end()  # what it holds now is what it will hold
    admitted = False
    tmp = None
    try:
        if not cache.trust_seals:
            return "untrusted"
        if cache.whole_file(entry.blake3) is not None:
            return "exists"
        if not all(cache.contains(cid) for cid in entry.chunk_ids):
            return "partial"
        if asm is not None:
            tmp, fd = asm.tmp, asm.fd
        else:
            tmp = cache.root / "tmp" / f"whole-{entry.blake3}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            outcome = _write_whole(cache, entry, fd, asm, deadline)
        finally:
            if asm is None:
                os.close(fd)
        if outcome:
            return outcome
        admitted = cache.put_whole(entry.blake3, tmp,
                                   list(zip(entry.chunk_ids, entry.offsets, entry.chunk_sizes)))
        return "made" if admitted else "no room"
    except OSError as e:
        return f"failed: {e.strerror or e}"
    finally:
        if asm is not None:
            # Admitted: its chunks are read from it as from any whole copy.  Else they become
            # chunk files, within the deadline (the descriptor still reads a removed copy).
            cache.end_assembly(asm, salvage=not admitted, deadline=deadline)
        elif tmp is not None and not admitted:
            tmp.unlink(missing_ok=True)


def _write_whole(cache, entry, fd: int, asm, deadline: float) -> str | None:
    """Write *entry*'s bytes from the cache to *fd* (or, into *asm*, an Assembly, only those it
    lacks), check them all against the file's blake3 and sync them: None, or what stopped it
    (make_whole's outcomes).

    A copy written with ``O_DIRECT`` gets the chunks it lacks, then is read back past the page
    cache to be checked; any other is checked as it is written, file order, the chunks it holds
    already read from it (from the page cache its writes filled)."""
    readback = asm is not None and asm.direct_fd is not None
    if readback:
        todo = [(cid, size) for cid, size in dict(zip(entry.chunk_ids, entry.chunk_sizes)).items()
                if cid not in asm.written]
    else:
        todo = list(zip(entry.chunk_ids, entry.chunk_sizes))

    def load(cid: str, size: int):
        if asm is not None and cid in asm.written:
            return asm.read(cid, 0, size)  # checked with the rest, against the file's blake3
        return cache.get(cid, size)

    pool = ThreadPoolExecutor(READERS, thread_name_prefix="mlfs-whole")
    ahead: collections.deque = collections.deque()
    try:
        digest = blake3.blake3()
        pos = 0
        # Chunk files read READ_AHEAD ahead of the hash and the write, READERS at a time: on
        # this VM one at a time took 1.2-1.3 s for the 555 MiB model with the page cache
        # dropped (docs/adr/0036).
        items = iter(todo)
        for cid, size in items:
            ahead.append((cid, size, pool.submit(load, cid, size)))
            if len(ahead) >= READ_AHEAD:
                break
        while ahead:
            if time.monotonic() > deadline:
                return "abandoned"
            cid, size, fut = ahead.popleft()
            nxt = next(items, None)
            if nxt is not None:
                ahead.append((*nxt, pool.submit(load, *nxt)))
            data = fut.result()
            if data is None or len(data) != size:
                return "partial"
            if readback:
                asm.fill(cid, data)  # at each of its offsets; checked below, with the rest
                continue
            digest.update(data)
            if asm is None:
                pwrite_all(fd, data, pos)
            elif cid not in asm.written:
                asm.fill(cid, data)
            pos += size
        if readback:
            # Its chunks were checked as they came; the file's blake3 is checked on the disk's
            # bytes, read back past the page cache (the copy's name is that blake3).
            got = asm.sync_and_hash(deadline)
            if got is None:
                return "abandoned"
            return None if got == entry.blake3 else "damaged"
        if pos != entry.size or digest.hexdigest() != entry.blake3:
            return "damaged"
        os.fdatasync(fd)  # admitted only once on disk: nothing checks it after
        return None
    finally:
        for _, _, fut in ahead:
            fut.cancel()
        pool.shutdown(wait=True)
