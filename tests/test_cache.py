"""The chunk cache below the mount: direct I/O round trips, verification on load, the size budget.

Mount-level behaviour (sharing between processes, remounts, a full disk) is in test_mount.py and
test_faults.py; here the cache is called directly, with O_DIRECT on and off.
"""

from __future__ import annotations

import os
import sqlite3
import time

import blake3
import pytest

from conftest import require
from mlfs import directio
from mlfs.cache import SEAL, ChunkCache

PAGE = directio.PAGE
SIZES = [0, 1, PAGE - 1, PAGE, PAGE + 1, (4 << 20) + 5]


def chunk(size: int, seed: int = 0) -> tuple[str, bytes]:
    data = (bytes([seed % 251]) + os.urandom(17)) * (size // 18 + 1)
    data = data[:size]
    return blake3.blake3(data).hexdigest(), data


@pytest.fixture(params=["direct", "buffered"])
def cache(request, tmp_path) -> ChunkCache:
    c = ChunkCache(tmp_path / "cache", 64 << 20)
    if request.param == "buffered":
        c.direct = c.direct_reads = False
    else:
        require(c.direct and c.direct_reads, "no O_DIRECT on the test file system")
    return c


def test_direct_io_is_used_where_the_file_system_allows_it(tmp_path):
    # tmp_path is on the machine's disk (ext4/xfs/overlay on CI): O_DIRECT must be taken there, or
    # the cache silently goes back to doubling every byte in the page cache.
    assert directio.supported(tmp_path) == ChunkCache(tmp_path / "c", 1 << 20).direct
    with open("/proc/mounts") as f:
        fstypes = {line.split()[1]: line.split()[2] for line in f}
    mount = max((m for m in fstypes if str(tmp_path).startswith(m.rstrip("/") + "/") or m == "/"),
                key=len)
    if fstypes[mount] in ("ext4", "xfs", "btrfs", "overlay"):
        assert directio.supported(tmp_path)


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_is_byte_exact_for_every_size(cache, size):
    cid, data = chunk(size)
    assert cache.put(cid, data)
    assert os.path.getsize(cache.path(cid)) == size + SEAL  # page padding cut off, seal kept
    got = cache.get(cid, size)
    assert got is not None and bytes(got) == data


@pytest.mark.parametrize("damage", ["flip", "flip seal", "truncate", "extend"])
def test_damaged_file_is_detected_removed_and_counted(cache, damage):
    cid, data = chunk(PAGE * 3 + 7)
    assert cache.put(cid, data)
    path = cache.path(cid)
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[PAGE + 1] ^= 0x40
    elif damage == "flip seal":
        raw[-3] ^= 0x01
    elif damage == "truncate":
        raw = raw[:-1]
    else:
        raw += b"\0"
    path.write_bytes(bytes(raw))
    assert cache.get(cid, len(data)) is None
    assert cache.corrupt == 1 and not path.exists()
    assert cache.put(cid, data) and bytes(cache.get(cid, len(data))) == data


def test_file_under_another_chunks_name_is_rejected(cache):
    # Content and seal intact, but not the chunk asked for (a file copied or renamed by hand).
    a, data_a = chunk(5000, seed=1)
    b, data_b = chunk(5000, seed=2)
    assert cache.put(a, data_a) and cache.put(b, data_b)
    cache.path(b).write_bytes(cache.path(a).read_bytes())
    assert cache.get(b, 5000) is None and cache.corrupt == 1
    assert bytes(cache.get(a, 5000)) == data_a


@pytest.mark.parametrize("intact", [True, False])
def test_unsealed_files_of_older_caches_are_checked_with_blake3(cache, intact):
    cid, data = chunk(PAGE + 11)
    assert cache.put(cid, data)
    old = bytearray(data)
    if not intact:
        old[7] ^= 0x10
    cache.path(cid).write_bytes(bytes(old))  # what mlfs 0.1 wrote: the bytes, no seal
    got = cache.get(cid, len(data))
    assert (bytes(got) == data) if intact else (got is None and cache.corrupt == 1)


def test_budget_is_kept_by_evicting_least_recently_used(tmp_path):
    c = ChunkCache(tmp_path / "cache", 3 * ((1 << 20) + SEAL))  # room for three sealed files
    ids = []
    for i in range(4):  # the fourth needs room: the least recently used one goes
        cid, data = chunk(1 << 20, seed=i)
        ids.append(cid)
        assert c.put(cid, data)
        if i == 1:
            assert c.get(ids[0], 1 << 20) is not None  # touch the first: it must survive
    st = c.stats()
    assert st["bytes"] <= 3 * ((1 << 20) + SEAL) and st["chunks"] == 3
    assert [c.contains(i) for i in ids] == [True, False, True, True]


def test_last_access_times_are_written_in_batches(tmp_path):
    """A warm load reads hundreds of chunks a second; one index write per load held the write
    lock for ~1 s of thread time per GiB.  Loads now queue their access time; a batch, an
    eviction or flush_atimes (unmount) writes them in one transaction."""
    c = ChunkCache(tmp_path / "cache", 1 << 30)
    cid, data = chunk(1 << 10)
    assert c.put(cid, data)
    db = sqlite3.connect(tmp_path / "cache" / "index.db")
    (before,) = db.execute("SELECT atime FROM chunks WHERE id = ?", [cid]).fetchone()
    time.sleep(0.01)
    assert c.get(cid, len(data)) is not None
    assert db.execute("SELECT atime FROM chunks WHERE id = ?", [cid]).fetchone()[0] == before
    c.flush_atimes()
    assert db.execute("SELECT atime FROM chunks WHERE id = ?", [cid]).fetchone()[0] > before


@pytest.mark.parametrize("direct", [True, False])
def test_read_file_returns_exact_bytes_or_none(tmp_path, direct):
    if direct:
        require(directio.supported(tmp_path), "no O_DIRECT on the test file system")
    for size in SIZES:
        _, data = chunk(size)
        path = tmp_path / f"f{size}-{direct}"
        directio.write_file(path, data, direct)
        assert directio.read_file(path, size, direct) == data
        assert directio.read_file(path, size + 1, direct) is None  # shorter than expected
        if size:
            assert directio.read_file(path, size - 1, direct) is None  # longer than expected


def test_unsupported_direct_io_falls_back_to_buffered(tmp_path, monkeypatch):
    c = ChunkCache(tmp_path / "cache", 64 << 20)
    c.direct = True
    real = directio.write_file

    def refuse(path, data, direct, trailer=b""):
        if direct:
            raise directio.DirectIOUnsupported(22, "O_DIRECT refused")
        return real(path, data, direct, trailer)

    monkeypatch.setattr(directio, "write_file", refuse)
    cid, data = chunk(PAGE + 3)
    assert c.put(cid, data) and c.direct is False
    assert bytes(c.get(cid, len(data))) == data
    assert not list((tmp_path / "cache" / "tmp").iterdir())  # the refused temp file is gone


def test_refused_direct_reads_fall_back_to_buffered(tmp_path, monkeypatch):
    c = ChunkCache(tmp_path / "cache", 64 << 20)
    cid, data = chunk(PAGE + 3)
    assert c.put(cid, data)
    c.direct_reads = True

    def refuse(path, limit):
        raise directio.DirectIOUnsupported(22, "O_DIRECT refused")

    monkeypatch.setattr(directio, "read_direct", refuse)
    monkeypatch.setattr(directio, "read_sealed", lambda path, *a: refuse(path, 0))  # the C path
    assert bytes(c.get(cid, len(data))) == data and c.direct_reads is False
    assert c.corrupt == 0


def test_direct_reads_return_the_file_s_bytes_up_to_the_limit_read_only(tmp_path):
    require(directio.supported(tmp_path), "no O_DIRECT on the test file system")
    for size in SIZES:
        path = tmp_path / f"f{size}"
        data = os.urandom(size)
        path.write_bytes(data)
        for limit in (size + 1, size, max(size - 1, 0), PAGE * 3 + 1):
            view = directio.read_direct(path, limit)
            assert bytes(view) == data[:limit] and view.readonly


def test_a_direct_read_s_buffer_lives_as_long_as_its_view(tmp_path):
    """read_direct fills a new bytes object through a view that does not own it (mlfs.buffers):
    the view handed back must keep the object alive after everything else is gone."""
    import gc

    require(directio.supported(tmp_path), "no O_DIRECT on the test file system")
    data = os.urandom(3 << 20)
    (tmp_path / "f").write_bytes(data)
    views = [directio.read_direct(tmp_path / "f", len(data)) for _ in range(4)]
    gc.collect()
    noise = [os.urandom(3 << 20) for _ in range(8)]  # reuse whatever was freed
    assert all(bytes(v) == data for v in views) and len(noise) == 8
    with pytest.raises(ValueError):
        from mlfs.buffers import unfilled
        unfilled(1)


def test_running_totals_match_the_index_whatever_touches_it(tmp_path):
    c = ChunkCache(tmp_path / "cache", 5 * (PAGE + SEAL))
    ids = []
    for i in range(8):  # admissions with evictions once five are in
        cid, data = chunk(PAGE, seed=i)
        ids.append(cid)
        assert c.put(cid, data)
    c.path(ids[-1]).write_bytes(b"damaged")
    assert c.get(ids[-1], PAGE) is None  # removal of a damaged file
    c.shrink(2 * (PAGE + SEAL))
    db = c._db()
    exact = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM chunks").fetchone()
    assert exact == (2, 2 * (PAGE + SEAL))
    assert (c.stats()["chunks"], c.stats()["bytes"]) == exact


def test_index_of_an_older_cache_gets_its_totals(tmp_path):
    import sqlite3

    root = tmp_path / "cache"
    (root / "chunks").mkdir(parents=True)
    conn = sqlite3.connect(root / "index.db")  # the layout mlfs wrote before totals existed
    conn.execute("CREATE TABLE chunks ([id] TEXT PRIMARY KEY, [size] INTEGER, [atime] FLOAT)")
    conn.executemany("INSERT INTO chunks VALUES (?, ?, 0)", [("a" * 64, 10), ("b" * 64, 32)])
    conn.commit()
    conn.close()
    c = ChunkCache(root, 1 << 20)
    assert (c.stats()["chunks"], c.stats()["bytes"]) == (2, 42)
    cid, data = chunk(100)
    assert c.put(cid, data) and c.stats()["bytes"] == 42 + 100 + SEAL


def test_index_of_the_last_layout_gets_the_table_of_copies_being_written(tmp_path):
    """A cache whose index the previous mlfs wrote (totals, block checksums, whole copies and
    their trigger; no table of copies being written) opens, keeps what it holds, and gains the
    table (docs/adr/0040)."""
    import sqlite3

    root = tmp_path / "cache"
    cid, data = chunk(PAGE)
    assert ChunkCache(root, 1 << 20).put(cid, data)
    conn = sqlite3.connect(root / "index.db")
    conn.execute("DROP TABLE assembling")
    conn.commit()
    conn.close()
    c = ChunkCache(root, 1 << 20)
    assert bytes(c.get(cid, PAGE)) == data
    assert c._db().execute("SELECT COUNT(*) FROM assembling").fetchone() == (0,)
    triggers = {r[0] for r in c._db().execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    assert "whole_removed" in triggers


def test_seals_are_not_trusted_where_others_can_write_chunk_files(tmp_path):
    # A seal is a checksum anyone can compute: in a cache directory that other users can write,
    # a planted file with a valid seal must still fail, because loads then re-hash with blake3.
    from mlfs.cache import seal

    root = tmp_path / "shared"
    assert ChunkCache(root, 1 << 20).trust_seals  # created by the cache: 0755 whatever the umask
    os.chmod(root / "chunks", 0o777)
    c = ChunkCache(root, 1 << 20)
    assert not c.trust_seals
    cid, data = chunk(PAGE)
    assert c.put(cid, data) and bytes(c.get(cid, PAGE)) == data
    forged = bytes(PAGE)
    c.path(cid).write_bytes(forged + seal(cid, forged))
    assert c.get(cid, PAGE) is None and c.corrupt == 1


def test_prune_indexes_genuine_strays_and_removes_the_rest(tmp_path):
    from mlfs.cache import seal

    c = ChunkCache(tmp_path / "cache", 1 << 20)
    good, data = chunk(3000, seed=1)
    old, old_data = chunk(2000, seed=2)
    forged, _ = chunk(1000, seed=3)
    for cid, raw in ((good, data + seal(good, data)), (old, old_data),  # sealed; pre-seal layout
                     (forged, bytes(1000) + seal(forged, bytes(1000)))):  # valid seal, wrong bytes
        c.path(cid).parent.mkdir(exist_ok=True)
        c.path(cid).write_bytes(raw)  # a crash between rename and commit leaves such files
    report = c.prune()
    assert report["strays_indexed"] == 2 and report["chunks"] == 2
    assert bytes(c.get(good, 3000)) == data and bytes(c.get(old, 2000)) == old_data
    assert not c.path(forged).exists()


def _anon_huge_kib(address: int) -> int | None:
    """AnonHugePages of the mapping holding *address* in this process (None if not found)."""
    lines = open("/proc/self/smaps").read().splitlines()
    for i, line in enumerate(lines):
        head = line.split()
        if "-" in head[0] and all(c in "0123456789abcdef-" for c in head[0]):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            if lo <= address < hi:
                for field in lines[i + 1:]:
                    if field.startswith("AnonHugePages:"):
                        return int(field.split()[1])
    return None


def test_huge_regions_are_reused_only_once_every_view_of_them_is_gone():
    """A region goes back to the pool when its last view goes (slices and read-only views
    included), and only then: a view kept is never handed out again underneath."""
    import ctypes

    from mlfs import buffers

    n = (4 << 20) + PAGE
    first = buffers.huge(n)
    assert first is not None and len(first) >= n and not first.readonly
    address = ctypes.addressof(ctypes.c_char.from_buffer(first))
    assert address % buffers.HUGE == 0
    first[:n] = b"\x5a" * n
    kept = first[PAGE:2 * PAGE].toreadonly()
    del first
    others = [buffers.huge(n) for _ in range(3)]
    for o in others:
        assert ctypes.addressof(ctypes.c_char.from_buffer(o)) != address
        o[:n] = b"\x00" * n
    assert bytes(kept) == b"\x5a" * PAGE
    del others
    mapped = buffers._pool.mapped
    del kept
    again = buffers.huge(n)  # the first region (or another freed one) comes back: no new mapping
    assert buffers._pool.mapped == mapped
    assert ctypes.addressof(ctypes.c_char.from_buffer(again)) % buffers.HUGE == 0


def test_huge_regions_get_huge_pages_where_the_kernel_gives_them():
    """Not a silent no-op: where transparent huge pages are offered on request, a region used
    for a chunk read is backed by them (docs/adr/0025)."""
    import ctypes

    from mlfs import buffers

    try:
        mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        mode = "[never]"
    require("[never]" not in mode, f"transparent huge pages are off here ({mode.strip()})")
    view = buffers.huge(4 << 20)
    view[:] = b"\x01" * len(view)  # fault it in
    kib = _anon_huge_kib(ctypes.addressof(ctypes.c_char.from_buffer(view)))
    assert kib is not None and kib >= 2048, kib


def test_the_pool_keeps_a_bounded_amount_of_free_memory():
    from mlfs import buffers

    views = [buffers.huge((2 << 20) + i * buffers.STEP) for i in range(24)]  # many sizes
    del views
    assert 0 < buffers._pool.free_bytes <= buffers.POOL_BYTES


def test_prefaulted_regions_serve_the_reads_of_whole_pieces(tmp_path):
    """A mount faults in a few regions before its first load (mlfs.buffers.prefault): reads of
    whole pieces then map no new memory, and the pool's bound holds."""
    from mlfs import buffers, config

    cache = ChunkCache(tmp_path / "cache", 1 << 30)
    require(cache.direct_reads, "O_DIRECT is refused here")
    buffers._pool.release_free()  # what earlier tests left
    ids = []
    for k in range(3):
        data = bytes([k + 1]) * config.PIECE_SIZE
        cid = blake3.blake3(data).hexdigest()
        cache.put(cid, data)
        ids.append(cid)
    added = cache.prefault()
    assert 1 <= added <= buffers.PREFAULT
    assert buffers._pool.free_bytes <= buffers.POOL_BYTES
    mapped = buffers._pool.mapped
    got = [cache.get(cid, config.PIECE_SIZE) for cid in ids[:added]]
    assert [bytes(g[:1]) for g in got] == [bytes([k + 1]) for k in range(len(got))]
    assert buffers._pool.mapped == mapped, "a read mapped fresh memory beside prefaulted regions"


def test_a_free_region_somewhat_larger_is_handed_out_but_not_a_much_larger_one():
    from mlfs import buffers

    buffers._pool.release_free()
    big = buffers.huge(4 << 20)
    size = len(big)
    del big  # free in the pool now
    mapped = buffers._pool.mapped
    smaller = buffers.huge(int(size / buffers.FIT) + buffers.STEP)  # fits: the free region serves
    assert buffers._pool.mapped == mapped and len(smaller) == size
    del smaller
    tiny = buffers.huge(buffers.HUGE_MIN)  # a region 2x its size would waste too much: a new one
    assert buffers._pool.mapped == mapped + 1 and len(tiny) < size
