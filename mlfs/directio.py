"""Chunk files read and written with or without ``O_DIRECT``, through page-aligned buffers.

The cache writes and reads chunk files with ``O_DIRECT`` (docs/adr/0008-direct-io-cache.md and
0019 have the measurements): a chunk served by a mount sits in the page cache as part of the mounted
file, and passing it through the page cache a second time costs 1-2 s of kernel CPU per GiB written
on this VM (0.15 s with ``O_DIRECT``) and ~0.75 s per GiB read (~0.2 s).

``O_DIRECT`` wants the buffer address and the transfer length aligned (the logical block size; the
page size is a multiple of every block size in use), and lengths are rounded up to whole pages.
Writes go through a page-aligned staging region that each thread keeps and reuses; a write of the
rounded length is cut back to the true size with ``ftruncate``.  Reads go straight into a
page-aligned window of a new ``bytes`` object, not zeroed first (:func:`read_direct`,
:mod:`mlfs.buffers`), and stop at the end of the file.

File systems without ``O_DIRECT`` (``open`` fails with ``EINVAL``) get the same calls through the page
cache; :func:`supported` tells which applies to a directory.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading

from . import dataplane
from .buffers import HUGE_MIN, huge, unfilled

PAGE = mmap.PAGESIZE
#: ``O_DIRECT`` reads are issued in pieces of at most this size.  A reader's miss then waits behind
#: a few 1 MiB requests in the disk's queue, not behind a stream's 4 MiB ones (10-40 ms per tensor
#: head in a warm load), and this disk reads chunk files faster so: 1.08-1.11 GB/s at 2-4
#: threads against 1.01-1.03 GB/s in 4 MiB reads (docs/adr/0023).
READ_PIECE = 1 << 20
_O_DIRECT = O_DIRECT = getattr(os, "O_DIRECT", 0)


def _round(n: int) -> int:
    return max(PAGE, (n + PAGE - 1) // PAGE * PAGE)


def buffer_bytes(limit: int) -> int:
    """The size of the buffer :func:`read_direct` takes for a read of *limit* bytes."""
    return _round(limit)


def _region(size: int) -> memoryview:
    """Writable, zeroed memory of *size* rounded up to whole pages, starting on a page boundary
    (an anonymous private mapping), as ``O_DIRECT`` transfers need."""
    return memoryview(mmap.mmap(-1, _round(size), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))


def buffer(size: int) -> memoryview:
    """A zeroed, page-aligned, writable buffer of *size* bytes (backed by whole pages)."""
    return _region(size)[:size]


def supported(directory: str | os.PathLike[str]) -> bool:
    """True if files in *directory* accept ``O_DIRECT`` reads and writes."""
    if not _O_DIRECT:
        return False
    path = os.path.join(directory, f".direct-probe.{os.getpid()}")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | _O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        page = buffer(PAGE)
        os.pwrite(fd, page, 0)
        return os.preadv(fd, [page], 0) == PAGE
    except OSError:
        return False
    finally:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass


_staging = threading.local()


def _stage(size: int) -> memoryview:
    """This thread's reusable aligned region of at least *size* bytes (rounded to whole pages).

    Fresh memory is dear here: faulting in a new 4 MiB mapping costs about 0.9 s of kernel time per
    GiB on this VM, so each thread keeps one region and grows it only when a larger chunk comes
    (a region from :func:`mlfs.buffers.huge` then stays leased by the thread).
    """
    region = getattr(_staging, "region", None)
    if region is None or len(region) < _round(size):
        # Huge pages where the chunk is large enough: this disk takes writes from them in
        # larger requests too, 1.34 against 0.99 GB/s for 4 MiB chunk files (docs/adr/0025).
        n = _round(size)
        region = _staging.region = (huge(n) if n >= HUGE_MIN else None) or _region(size)
    return region


def read_file(path: str | os.PathLike[str], size: int, direct: bool) -> bytes | None:
    """The file's bytes if it holds exactly *size* bytes; None if it is longer or shorter.

    Raises OSError if it cannot be opened or read.  The cache reads its (sealed) files with
    :func:`read_direct` (ChunkCache._read); this is the plain transfer that
    ``benchmarks/cache_io.py`` times both ways (docs/adr/0008).
    """
    if not direct:  # no alignment needed: read straight into the bytes object
        with open(path, "rb") as f:
            data = f.read(size + 1)  # one byte more than expected: a longer file is caught too
        return data if len(data) == size else None
    data = read_direct(path, size + 1)
    return bytes(data) if len(data) == size else None


def read_direct(path: str | os.PathLike[str], limit: int, offset: int = 0) -> memoryview:
    """Up to *limit* bytes of the file from *offset* (a multiple of the page size; fewer bytes at
    the file's end), read with ``O_DIRECT`` straight
    into the buffer that is handed back: from 2 MiB up a region backed by huge pages
    (:func:`mlfs.buffers.huge`, docs/adr/0025), which the disk takes in larger requests; below
    that a page-aligned window of a new ``bytes`` object.

    No staging copy and no page cache: on this VM a buffered load of a chunk file costs ~0.75 s of
    kernel CPU per GiB (filling the page cache, then copying out of it), this one ~0.2 s
    (docs/adr/0019).  Raises OSError; ``DirectIOUnsupported`` if the file system refuses
    ``O_DIRECT``.
    """
    n = _round(limit)
    raw, writable, start = _direct_buffer(n)
    got = 0
    try:
        fd = os.open(path, os.O_RDONLY | _O_DIRECT)
        try:
            while got < limit:
                k = os.preadv(fd, [writable[start + got:start + min(n, got + READ_PIECE)]],
                              offset + got)
                if k == 0:
                    break
                got += k
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise DirectIOUnsupported(str(e)) from None
            raise
        finally:
            os.close(fd)
    finally:
        if raw is not writable:
            writable.release()
    return _handed_out(raw, start, min(got, limit))


def _direct_buffer(n: int) -> tuple[object, memoryview, int]:
    """Memory for an ``O_DIRECT`` read of *n* bytes (a multiple of the page size): the object
    that owns it, a writable view, and where in the view the page-aligned window starts.  From
    2 MiB up a region backed by huge pages (docs/adr/0025), the view itself; below that a new
    ``bytes`` object, not zeroed (mlfs.buffers)."""
    writable = huge(n) if n >= HUGE_MIN else None
    if writable is not None:
        return writable, writable, 0
    raw, writable, address = unfilled(n + PAGE)
    return raw, writable, -address % PAGE


def aligned_buffer(size: int) -> tuple[object, memoryview]:
    """A writable, page-aligned buffer for ``O_DIRECT`` reads of up to *size* bytes (rounded up
    to whole pages), taken as :func:`read_direct` takes its own: the object that owns the memory
    (keep it while the view is in use) and the view."""
    n = _round(size)
    raw, writable, start = _direct_buffer(n)
    return raw, writable[start:start + n]


def _handed_out(raw, start: int, got: int) -> memoryview:
    """The *got* bytes read into *raw* (from _direct_buffer, its writable view released), as
    the read-only view handed out."""
    if isinstance(raw, memoryview):  # a pooled region: read-only from here; views keep it leased
        return raw[:got].toreadonly()
    # A view of the bytes object itself, which keeps it alive (the writable view does not).
    return memoryview(raw)[start:start + got]


def read_sealed(path: str | os.PathLike[str], size: int, seal_bytes: int, seed: int,
                block: int) -> tuple[memoryview, bool | None, bytes | None]:
    """A sealed chunk file read with ``O_DIRECT`` and checked in one call to the C data plane
    (:mod:`mlfs.dataplane`, which must be built): up to *size* + *seal_bytes* + 1 bytes of it, and
    whether the seal matched (None if the file was not *size* + *seal_bytes* long), with the
    checksums of its *block*-sized pieces if it did and *block* > 0.  Raises OSError;
    ``DirectIOUnsupported`` if the file system refuses ``O_DIRECT``."""
    want = size + seal_bytes + 1
    n = _round(want)
    raw, writable, start = _direct_buffer(n)
    try:
        got, ok, sums = dataplane.read_sealed(os.fspath(path), writable[start:start + n], want,
                                              size, seed, block)
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise DirectIOUnsupported(str(e)) from None
        raise
    finally:
        if raw is not writable:
            writable.release()
    return _handed_out(raw, start, got), (ok if got == size + seal_bytes else None), sums


def read_range(path: str | os.PathLike[str], offset: int, length: int, direct: bool) -> memoryview:
    """*length* bytes of the file from *offset* (fewer at its end), with ``O_DIRECT`` where
    *direct* (*offset* a multiple of the page size) or through the page cache.  Raises OSError."""
    if direct:
        return read_direct(path, length, offset)
    fd = os.open(path, os.O_RDONLY)
    try:
        return memoryview(os.pread(fd, length, offset))
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike[str], data, direct: bool, trailer: bytes = b"") -> None:
    """Create *path* holding *data* followed by *trailer* (the caller renames it into place).

    Raises OSError.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | (_O_DIRECT if direct else 0), 0o644)
    try:
        view = memoryview(data).cast("B")
        size = len(view) + len(trailer)
        if direct:
            src = _stage(size)[:_round(size)]
            src[:len(view)] = view
            src[len(view):size] = trailer
            parts = [src]
        else:
            parts = [view, memoryview(trailer)] if trailer else [view]
        done, total = 0, sum(len(p) for p in parts)
        while done < total:
            n = os.pwritev(fd, _tail(parts, done), done)
            done += n
        if direct and total != size:
            os.ftruncate(fd, size)
    except OSError as e:
        if direct and e.errno == errno.EINVAL:
            raise DirectIOUnsupported(str(e)) from None
        raise
    finally:
        os.close(fd)


def pwrite_all(fd: int, view, offset: int) -> None:
    """Write all of *view* at *offset* (``pwrite`` may write less than it is given)."""
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def write_at(fd: int, direct_fd: int | None, data, offset: int) -> None:
    """Write *data* at *offset* of a file open twice: the whole pages of the range with
    ``O_DIRECT`` (*direct_fd*, through this thread's staging region), the part pages at its ends
    through the page cache (*fd*; two neighbours share such a page, and only the page cache can
    merge their writes).  Everything through *fd* where *direct_fd* is None.  A whole copy written
    so costs no page cache (docs/adr/0039): buffered, 555 MiB of it cost the loader beside it
    1.4 s of CPU.  Raises OSError."""
    view = memoryview(data).cast("B")
    end = offset + len(view)
    first, last = -(-offset // PAGE) * PAGE, end // PAGE * PAGE
    if direct_fd is None or last - first < PAGE:
        pwrite_all(fd, view, offset)
        return
    if first > offset:
        pwrite_all(fd, view[:first - offset], offset)
    if end > last:
        pwrite_all(fd, view[last - offset:], last)
    src = _stage(last - first)[:last - first]
    src[:] = view[first - offset:last - offset]
    pwrite_all(direct_fd, src, first)


def read_piece(direct_fd: int, offset: int, limit: int, piece: int = 8 << 20) -> memoryview:
    """Up to min(*limit*, *piece*) bytes at *offset* (a multiple of the page size) of a file open
    with ``O_DIRECT``, in this thread's staging region (valid until its next use): a copy read
    back to be checked leaves no page cache behind.  Raises OSError."""
    n = min(limit, piece)
    buf = _stage(n)[:_round(n)]
    got = os.preadv(direct_fd, [buf], offset)
    return buf[:min(got, n)]


def _tail(parts: list[memoryview], skip: int) -> list[memoryview]:
    """*parts* without their first *skip* bytes (what is left to write after a short write)."""
    out = []
    for p in parts:
        if skip >= len(p):
            skip -= len(p)
            continue
        out.append(p[skip:])
        skip = 0
    return out


class DirectIOUnsupported(OSError):
    """``O_DIRECT`` was refused for this transfer (the caller falls back to buffered I/O)."""
