"""Which pages of a file the kernel's page cache holds, and which holes are worth filling.

A model file loaded through the mount sits in the page cache, and the next process that loads it
(a server restarted, a second worker) reads it at memory speed.  But the kernel lets go of single
pages of files nobody is using: memory pressure does, and so does a DAMON ``pageout`` scheme like
the one on the machine these figures come from.  Locally such a page costs a disk read of a few
pages.  Through FUSE each costs a round trip to the daemon, one at a time, in the loader's time.
Operations._mend asks this module where the holes are when the file is opened, and fills them all
at once (docs/adr/0034).

``mincore(2)`` reports residency for a mapping, so the file is mapped, and never touched.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re

PAGE = mmap.PAGESIZE
#: Bytes asked about per mincore call: its vector is WINDOW / PAGE bytes (256 KiB).
WINDOW = 1 << 30
#: Holes are filled only in a file of which at least this share of pages is in the page cache:
#: one that was loaded whole.  A file a reader took a few tensors of is not pulled in.
MOSTLY = 7 / 8

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value
# mincore sets bit 0 of a page's byte when the page is resident; the other bits are reserved.
_RESIDENT = bytes(i & 1 for i in range(256))


class Residency:
    """A mapping of the first *size* bytes of *fd* (read-only, never touched: no page is faulted
    in) to ask the kernel which pages its page cache holds.  Raises OSError.  ``close()`` unmaps;
    the caller closes *fd*."""

    def __init__(self, fd: int, size: int) -> None:
        self.size = size
        self.addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0) if size else 0
        if self.addr in (None, _MAP_FAILED):
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    def resident(self) -> bytes:
        """One byte per page: 1 if the page cache holds the page, else 0.  No I/O: a call never
        waits for the file system."""
        out = bytearray()
        for at in range(0, self.size, WINDOW):
            length = min(WINDOW, self.size - at)
            vec = ctypes.create_string_buffer(-(-length // PAGE))
            if _libc.mincore(self.addr + at, length, vec) != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))
            out += vec.raw
        return bytes(out).translate(_RESIDENT)

    def close(self) -> None:
        if self.addr:
            _libc.munmap(self.addr, self.size)
            self.addr = 0


def holes(pages: bytes, mostly: float = MOSTLY) -> list[tuple[int, int]]:
    """The runs of missing pages in *pages* (as :meth:`Residency.resident` returns them), as
    ``(first page, count)`` in file order; none unless at least *mostly* of the pages are
    resident."""
    if not pages or pages.count(1) < mostly * len(pages):
        return []
    return [(m.start(), m.end() - m.start()) for m in re.finditer(b"\x00+", pages)]
