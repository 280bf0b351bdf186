"""The C data plane (mlfs/_dataplane.c, docs/adr/0029) against the Python steps it replaces: the
same seal checks, block checksums and edge bytes, the job states a read uses to meet the stream.
Its pushes (FUSE_NOTIFY_STORE) need a kernel session: tests/test_load.py mounts for those."""

from __future__ import annotations

import os

import blake3
import pytest

from conftest import require
from mlfs import dataplane, directio
from mlfs.cache import BLOCK, SEAL, SMALL_CHUNK, ChunkCache


def chunk(size: int, seed: int) -> tuple[str, bytes]:
    data = (bytes([seed]) + os.urandom(31)) * (size // 32 + 1)
    data = data[:size]
    return blake3.blake3(data).hexdigest(), data


@pytest.fixture
def cache(tmp_path) -> ChunkCache:
    require(dataplane.NATIVE, "mlfs._dataplane is not built (needs a compiler and libxxhash-dev)")
    c = ChunkCache(tmp_path / "cache", 256 << 20)
    require(c.direct_reads and c.trust_seals, "no O_DIRECT or a shared cache directory here")
    return c


def job(c: ChunkCache, cid: str, size: int, head: int, tail_from: int, sums_at: int) -> tuple:
    block = BLOCK if size >= SMALL_CHUNK else 0
    return (str(c.path(cid)), size, int(cid[:16], 16), block, 0, 0, 0, head, tail_from, sums_at)


def test_read_sealed_checks_the_seal_and_the_blocks_as_the_python_steps_do(cache):
    for n, size in enumerate([1, 4095, SMALL_CHUNK, (4 << 20) + 77]):
        cid, data = chunk(size, n)
        assert cache.put(cid, data)
        view, ok, sums = directio.read_sealed(cache.path(cid), size, SEAL, int(cid[:16], 16),
                                              BLOCK if size >= SMALL_CHUNK else 0)
        assert ok is True and bytes(view[:size]) == data
        assert sums == (ChunkCache._block_sums(cid, data) if size >= SMALL_CHUNK else None)
        # The same file under the wrong size: no seal where one is expected.
        assert directio.read_sealed(cache.path(cid), size + 1, SEAL, int(cid[:16], 16), 0)[1] is None


def test_a_damaged_file_fails_its_seal_and_the_cache_removes_it(cache):
    cid, data = chunk(3 << 20, 7)
    assert cache.put(cid, data)
    path = cache.path(cid)
    raw = bytearray(path.read_bytes())
    raw[12345] ^= 1
    path.write_bytes(bytes(raw))
    assert directio.read_sealed(path, len(data), SEAL, int(cid[:16], 16), BLOCK)[1] is False
    assert cache.get(cid, len(data)) is None and cache.corrupt == 1 and not path.exists()


def test_stream_without_pushes_returns_what_the_python_stream_would(cache):
    """Jobs with nothing to push (no kernel here): each chunk's states, block checksums and edge
    bytes; a damaged file and a missing one are reported, the rest go on."""
    items = [chunk(s, n) for n, s in enumerate([5 << 20, 700, 4 << 20, 3 << 20, 2 << 20])]
    for cid, data in items:
        assert cache.put(cid, data)
    bad = cache.path(items[2][0])
    raw = bytearray(bad.read_bytes())
    raw[-1] ^= 1  # the seal's last byte changed (a fixed byte put there matched it 1 time in 256)
    bad.write_bytes(bytes(raw))
    cache.path(items[3][0]).unlink()
    jobs, at = [], 0
    for cid, data in items:
        jobs.append(job(cache, cid, len(data), 100, len(data) - 50, at))
        at += -(-len(data) // BLOCK) * 8 if len(data) >= SMALL_CHUNK else 0
    shared, sums = bytearray(3 * len(jobs)), bytearray(at)
    buffers = [directio.aligned_buffer((5 << 20) + SEAL + 1) for _ in range(2)]
    results, _ = dataplane.stream(-1, 1, jobs, [v for _, v in buffers], 1 << 20, shared, sums)
    status = [r[0] for r in results]
    assert status == [dataplane.OK, dataplane.OK, dataplane.DAMAGED, dataplane.MISSING,
                      dataplane.OK]
    for (cid, data), j, (st, _, head, tail) in zip(items, jobs, results):
        if st != dataplane.OK:
            continue
        assert head == data[:100] and tail == data[-50:]
        if j[3]:
            assert bytes(sums[j[9]:j[9] + -(-len(data) // BLOCK) * 8]) == ChunkCache._block_sums(cid, data)
    assert list(shared[0::3]) == [dataplane.DONE, dataplane.DONE, dataplane.FAILED, dataplane.FAILED,
                                  dataplane.DONE]
    assert shared[2::3] == bytes(5)  # no pins left


def test_a_read_claims_a_job_no_thread_has_taken_and_pins_only_verified_ones(cache):
    cid, data = chunk(4 << 20, 3)
    assert cache.put(cid, data)
    blocks = (4 << 20) // BLOCK
    shared, sums = bytearray(3 * 2), bytearray(2 * blocks * 8)
    assert dataplane.pin(shared, 0) == -1  # queued: nothing to copy from
    assert dataplane.claim(shared, 0) == dataplane.QUEUED  # ... and now the read's
    assert dataplane.claim(shared, 0) == dataplane.CLAIMED
    buffers = [directio.aligned_buffer((4 << 20) + SEAL + 1)]
    jobs = [job(cache, cid, len(data), 0, len(data), 0), job(cache, cid, len(data), 0, len(data), blocks * 8)]
    results, _ = dataplane.stream(-1, 1, jobs, [v for _, v in buffers], 1 << 20, shared, sums)
    assert [r[0] for r in results] == [dataplane.TAKEN, dataplane.OK]
    assert dataplane.claim(shared, 1) == dataplane.DONE and dataplane.pin(shared, 1) == -1
    with pytest.raises(IndexError):
        dataplane.claim(shared, 2)


def test_block_checksums_stored_with_a_chunk_serve_a_new_process_s_part_reads(cache, tmp_path):
    cid, data = chunk(4 << 20, 9)
    assert cache.put(cid, data)
    again = ChunkCache(tmp_path / "cache", 256 << 20)  # another mount: nothing in memory
    assert again.get_part(cid, len(data), 5000, 9000) is None
    assert again.load_block_sums([cid]) == 1
    assert bytes(again.get_part(cid, len(data), 5000, 9000)) == data[5000:9000]
    # Wrong stored checksums cost a whole read, never wrong bytes, and are forgotten.
    db = again._db()
    db.execute("UPDATE chunks SET blocks = ? WHERE id = ?", [bytes(len(data) // BLOCK * 8), cid])
    third = ChunkCache(tmp_path / "cache", 256 << 20)
    assert third.load_block_sums([cid]) == 1
    assert third.get_part(cid, len(data), 5000, 9000) is None
    third.flush_atimes()
    assert db.execute("SELECT blocks FROM chunks WHERE id = ?", [cid]).fetchone()[0] is None
    assert bytes(third.get(cid, len(data))) == data


def test_checksums_stored_for_another_block_size_are_cleared_and_replaced(cache, tmp_path):
    """A cache written when blocks were 128 KiB (docs/adr/0034 made them 32 KiB) holds tables
    that do not fit a chunk's size now: they are not used, they are cleared at the next flush,
    and the chunk's next whole read stores tables of today's size."""
    cid, data = chunk(4 << 20, 12)
    assert cache.put(cid, data)
    db = cache._db()
    right = db.execute("SELECT blocks FROM chunks WHERE id = ?", [cid]).fetchone()[0]
    assert len(right) == len(data) // BLOCK * 8
    db.execute("UPDATE chunks SET blocks = ? WHERE id = ?", [bytes(len(data) // (128 << 10) * 8), cid])
    other = ChunkCache(tmp_path / "cache", 256 << 20)
    assert other.load_block_sums([cid]) == 0 and not other.has_blocks(cid)
    other.flush_atimes()
    assert db.execute("SELECT blocks FROM chunks WHERE id = ?", [cid]).fetchone()[0] is None
    assert bytes(other.get(cid, len(data))) == data
    other.flush_atimes()
    assert db.execute("SELECT blocks FROM chunks WHERE id = ?", [cid]).fetchone()[0] == right


def test_wrong_stored_checksums_are_replaced_by_a_whole_read_in_the_same_batch(cache, tmp_path):
    """A part read that finds the stored checksums wrong clears them; a whole read of the chunk
    before the next flush computes the right ones: the index gets those (the clearing used to
    be overwritten by them and skipped, leaving the wrong ones stored).  A whole read of a chunk
    whose checksums the index already holds queues nothing."""
    cid, data = chunk(4 << 20, 11)
    assert cache.put(cid, data)
    db = cache._db()
    right = db.execute("SELECT blocks FROM chunks WHERE id = ?", [cid]).fetchone()[0]
    assert right is not None
    assert bytes(cache.get(cid, len(data))) == data  # whole: the index has these already
    assert cache._new_sums == {} and cache._wrong_sums == set()
    db.execute("UPDATE chunks SET blocks = ? WHERE id = ?", [bytes(len(right)), cid])
    other = ChunkCache(tmp_path / "cache", 256 << 20)
    assert other.load_block_sums([cid]) == 1
    assert other.get_part(cid, len(data), 5000, 9000) is None  # wrong: cleared, not used again
    assert bytes(other.get(cid, len(data))) == data
    other.flush_atimes()
    assert db.execute("SELECT blocks FROM chunks WHERE id = ?", [cid]).fetchone()[0] == right
    assert bytes(other.get_part(cid, len(data), 5000, 9000)) == data[5000:9000]
