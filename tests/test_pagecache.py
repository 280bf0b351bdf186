"""mlfs.pagecache: what the kernel's page cache holds of a file (mincore through a mapping that is
never touched), and which holes a mend fills (docs/adr/0034).  Pure units, and one real file."""

from __future__ import annotations

import os

from mlfs.pagecache import PAGE, Residency, holes


def test_holes_are_the_runs_of_missing_pages_in_file_order():
    pages = bytearray([1] * 100)
    assert holes(bytes(pages)) == []
    pages[3] = 0
    pages[50:53] = bytes(3)
    pages[99] = 0
    assert holes(bytes(pages)) == [(3, 1), (50, 3), (99, 1)]


def test_a_file_held_only_in_part_has_no_holes_to_fill():
    """A reader that took a few tensors left most of the file out: that is not a hole."""
    pages = bytes([1] * 80 + [0] * 20)
    assert holes(pages) == []  # 80% held: under 7/8
    assert holes(pages, mostly=0.8) == [(80, 20)]
    assert holes(b"") == []


def test_residency_reports_the_pages_read_and_nothing_else(tmp_path):
    f = tmp_path / "f"
    size = (8 << 20) + 100  # a last page in part
    with open(f, "wb") as w:
        w.write(os.urandom(size))
        w.flush()
        os.fsync(w.fileno())
    fd = os.open(f, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead around the reads below
        r = Residency(fd, size)
        try:
            assert r.resident() == bytes(size // PAGE + 1)
            os.pread(fd, PAGE, 0)
            os.pread(fd, PAGE, 1536 * PAGE)
            os.pread(fd, 10, size - 10)
            got = r.resident()
            assert len(got) == size // PAGE + 1
            assert [i for i, v in enumerate(got) if v] == [0, 1536, size // PAGE]
            assert got[1530:1540] == bytes(6) + b"\x01" + bytes(3)
            assert got[size // PAGE:] == b"\x01"  # the last page, in part
        finally:
            r.close()
    finally:
        os.close(fd)
