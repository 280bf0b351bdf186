"""The in-process tier (S3QL's t3_fs_api): Operations, ChunkSource and Switcher driven under trio
against the local store and a fake store that fails, stalls and corrupts on demand — no kernel.

Kernel mounts (test_mount.py, test_switch.py, test_robustness.py) stay for what only a kernel shows.
"""

from __future__ import annotations

import errno
import os
import threading
import time

import pyfuse3
import pytest
import trio

from conftest import require, with_note
from mlfs import manifest as mf
from mlfs.cache import ChunkCache
from mlfs.errors import MlfsError, ObjectNotFound, StoreError, StorePermissionError
from mlfs.fetch import ChunkSource
from mlfs.fs import Operations
from mlfs.generate import generate
from mlfs.stores import LocalStore
from mlfs.supervise import Supervisor
from mlfs.switch import Switcher
from mlfs.tree import ROOT_INODE, Inodes, Tree, chunk_slices

PIECE = 4 << 20


@pytest.fixture(autouse=True)
def no_internal_errors(request, caplog):
    """S3QL's checklogs: a test during which mlfs logged a traceback or an internal error fails,
    even if the request that hit it was answered with EIO (``@pytest.mark.logs_bugs`` opts out)."""
    yield
    if request.node.get_closest_marker("logs_bugs"):
        return
    bad = [r.getMessage() for r in caplog.records if r.name.startswith("mlfs")
           and (r.exc_info or "internal error" in r.getMessage())]
    assert not bad, f"mlfs logged internal errors: {bad}"


class FakeStore(LocalStore):
    """The local store with knobs: ``fail`` (chunk ids whose GET raises a permanent error),
    ``corrupt`` (ids whose bytes come back flipped), ``stall`` (seconds every GET sleeps first),
    ``boom`` (ids whose GET raises an exception no store should raise); ``gets`` counts GETs."""

    def __init__(self, root) -> None:
        super().__init__(root, create=True)
        self.fail: set[str] = set()
        self.corrupt: set[str] = set()
        self.boom: set[str] = set()
        self.stall = 0.0
        self.gets: dict[str, int] = {}
        self._lock = threading.Lock()

    def _get(self, key: str) -> bytes:
        cid = key.rsplit("/", 1)[-1]
        with self._lock:
            self.gets[cid] = self.gets.get(cid, 0) + 1
        if self.stall:
            time.sleep(self.stall)
        if cid in self.fail:
            raise ObjectNotFound(f"{key} not found (injected)")
        if cid in self.boom:
            raise RuntimeError("a backend bug (injected)")
        data = super()._get(key)
        if cid in self.corrupt:
            data = bytes([data[0] ^ 1]) + data[1:]
        return data


@pytest.fixture
def model(tmp_path):
    """Three generic pieces (4 MiB, 4 MiB, 1 MiB + 3) and a small file, in a fake store."""
    d = tmp_path / "model"
    d.mkdir()
    blob = os.urandom(2 * PIECE + (1 << 20) + 3)
    (d / "blob.bin").write_bytes(blob)
    (d / "config.json").write_text('{"a": 1}')
    store = FakeStore(tmp_path / "store")
    m = generate(d, store, "m", "v1").manifest
    return store, m, blob


def make_ops(store, m, tmp_path, **kw):
    cache = ChunkCache(tmp_path / "cache", 1 << 30)
    source = ChunkSource(store, cache, **kw)
    inodes = Inodes()
    ops = Operations(Tree.of(m, inodes), source, {}, inodes=inodes, supervisor=Supervisor())
    return ops, source, inodes


async def open_file(ops, name: str) -> int:
    attr = await ops.lookup(ROOT_INODE, name.encode())
    info = await ops.open(attr.st_ino, os.O_RDONLY, None)
    return info.fh


async def until(cond):
    """Wait (up to 2 s) for *cond* to hold: work that threads finish off the event loop."""
    for _ in range(200):
        if cond():
            return
        await trio.sleep(0.01)
    raise AssertionError("timed out")


def run(fn):
    """Run ``fn(nursery)`` under trio with the nursery given to read-ahead, as mount.py does."""
    async def main():
        async with trio.open_nursery() as n:
            await fn(n)
            n.cancel_scope.cancel()
    trio.run(main)


def test_chunk_slices_at_every_boundary(model):
    _, m, blob = model
    f = next(f for f in m.files if f.path == "blob.bin")
    edges = [0, *f.offsets[1:], f.size]
    for edge in edges:
        for off in (edge - 1, edge, edge + 1):
            for size in (1, 2, 4095, PIECE + 1):
                if off < 0:
                    continue
                got = b"".join(blob[f.offsets[i] + a:f.offsets[i] + b]
                               for i, a, b in chunk_slices(f, off, size))
                assert got == blob[off:off + size], (off, size)
    assert chunk_slices(f, f.size, 10) == [] and chunk_slices(f, f.size + 5, 10) == []


def test_reads_at_every_boundary_are_exact(model, tmp_path):
    store, m, blob = model
    ops, source, _ = make_ops(store, m, tmp_path)

    async def go(n):
        ops.supervisor.nursery = n
        fh = await open_file(ops, "blob.bin")
        for edge in (0, PIECE, 2 * PIECE, len(blob)):
            for off in (edge - 1, edge, edge + 1):
                for size in (1, 3, 131072, PIECE + 7):
                    if off < 0:
                        continue
                    assert bytes(await ops.read(fh, off, size)) == blob[off:off + size], (off, size)
        await ops.release(fh)
    run(go)
    assert source.counters.fetch_errors == 0


def test_single_flight_one_get_per_chunk_whatever_the_readers(model, tmp_path):
    store, m, blob = model
    store.stall = 0.2  # every reader arrives while the first GET is still out
    ops, source, _ = make_ops(store, m, tmp_path)

    async def go(n):
        fhs = [await open_file(ops, "blob.bin") for _ in range(8)]
        out = {}

        async def reader(i, fh):
            out[i] = bytes(await ops.read(fh, 1000 + i, 4096))
        async with trio.open_nursery() as inner:
            for i, fh in enumerate(fhs):
                inner.start_soon(reader, i, fh)
        for i in out:
            assert out[i] == blob[1000 + i:1000 + i + 4096]
    run(go)
    first = next(f for f in m.files if f.path == "blob.bin").chunk_ids[0]
    assert store.gets[first] == 1


@pytest.mark.parametrize("fault", ["missing", "corrupt", "stall", "boom"])
def test_a_chunk_that_cannot_be_had_is_eio_and_the_next_read_works(model, tmp_path, fault):
    store, m, blob = model
    f = next(f for f in m.files if f.path == "blob.bin")
    bad = f.chunk_ids[1]
    ops, source, _ = make_ops(store, m, tmp_path, timeout=1.0)
    if fault == "missing":
        store.fail.add(bad)
    elif fault == "corrupt":
        store.corrupt.add(bad)
    elif fault == "boom":
        store.boom.add(bad)

    async def go(n):
        fh = await open_file(ops, "blob.bin")
        if fault == "stall":
            store.stall = 3.0
        t = time.monotonic()
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.read(fh, PIECE + 5, 100)
        assert e.value.errno == errno.EIO
        assert time.monotonic() - t < 2.5  # the timeout, not the stall, decides
        store.stall = 0.0
        store.fail.clear(), store.corrupt.clear(), store.boom.clear()
        assert bytes(await ops.read(fh, PIECE + 5, 100)) == blob[PIECE + 5:PIECE + 105]
    run(go)
    assert source.counters.fetch_errors >= 1
    if fault == "corrupt":
        from mlfs import config

        assert store.corrupt_reads == config.CORRUPT_ATTEMPTS  # fetched again before it was called corrupt


def test_unmapped_backend_errors_become_store_errors(model):
    store, m, _ = model
    cid = m.files[0].chunk_ids[0]
    store.boom.add(cid)
    with pytest.raises(StoreError, match="RuntimeError: a backend bug"):
        store.get_chunk(cid)
    with pytest.raises(MlfsError):
        store.get_chunk_verified(cid, m.files[0].chunk_sizes[0])


def version(base: mf.Manifest, store, i: int) -> mf.Manifest:
    return with_note(base, store, i, "v")


def test_flip_keeps_old_handles_and_releases_forgotten_inodes(model, tmp_path):
    store, base, _ = model
    v1, v2 = version(base, store, 1), version(base, store, 2)
    ops, source, inodes = make_ops(store, v1, tmp_path)
    invalidated = []
    sw = Switcher(ops, source, inodes, invalidate=lambda p, n: invalidated.append((p, n)))

    async def go(n):
        attr = await ops.lookup(ROOT_INODE, b"note.txt")  # the kernel now knows the v1 inode
        old_ino = attr.st_ino
        fh = (await ops.open(old_ino, os.O_RDONLY, None)).fh
        blob_ino = (await ops.lookup(ROOT_INODE, b"blob.bin")).st_ino
        result = await sw.switch_manifest(v2)
        assert result["to"] == "m@v2" and (ROOT_INODE, b"note.txt") in invalidated
        assert (await ops.lookup(ROOT_INODE, b"blob.bin")).st_ino == blob_ino  # unchanged file
        new = await open_file(ops, "note.txt")
        assert bytes(await ops.read(new, 0, 100)) == b"version 2\n"
        assert bytes(await ops.read(fh, 0, 100)) == b"version 1\n"  # opened before the flip
        assert old_ino in ops.retired
        await ops.release(fh)
        assert old_ino in ops.retired  # the kernel still knows it
        await ops.forget([(old_ino, 1)])
        assert old_ino not in ops.retired
        with pytest.raises(pyfuse3.FUSEError):
            await ops.getattr(old_ino, None)
    run(go)


def test_a_switch_to_another_model_needs_to_be_asked_for(model, tmp_path):
    store, base, _ = model
    other = mf.Manifest("other", "v1", base.files, store=store.url)
    ops, source, inodes = make_ops(store, base, tmp_path)
    sw = Switcher(ops, source, inodes, invalidate=lambda p, n: None)

    async def go(n):
        with pytest.raises(MlfsError, match="another model.*--allow-model-change"):
            await sw.switch_manifest(other)
        assert ops.tree.manifest.id == "m"
        await sw.switch_manifest(other, allow_model_change=True)
        assert ops.tree.manifest.id == "other"
    run(go)


def test_two_hundred_switches_keep_per_mount_state_bounded(model, tmp_path):
    """Each switch changes note.txt; the 'kernel' looks it up, opens, reads and forgets it as the
    real one does after invalidate_entry.  What the mount keeps must not grow with the switches."""
    store, base, _ = model
    ops, source, inodes = make_ops(store, version(base, store, 0), tmp_path)
    sw = Switcher(ops, source, inodes, invalidate=lambda p, n: None)
    sizes = []

    async def go(n):
        ops.supervisor.nursery = n
        held = None
        for i in range(1, 201):
            await sw.switch_manifest(version(base, store, i), warm=(i % 2 == 0))
            attr = await ops.lookup(ROOT_INODE, b"note.txt")
            fh = (await ops.open(attr.st_ino, os.O_RDONLY, None)).fh
            assert bytes(await ops.read(fh, 0, 64)) == f"version {i}\n".encode()
            await ops.release(fh)
            # The kernel forgets the previous version's inode once invalidated.
            if held is not None:
                await ops.forget([held])
            held = (attr.st_ino, 1)
            sizes.append((len(ops.retired), len(inodes), len(ops.lookups), len(ops._tensor_index)))
    run(go)
    assert max(s[0] for s in sizes) <= 1
    assert sizes[-1][1] <= len(sizes[0]) + 4 and max(s[1] for s in sizes) <= 6
    assert max(s[2] for s in sizes) <= 3


@pytest.mark.parametrize("case", ["warm, a GET fails", "checked, a chunk missing",
                                  "checked, the store refuses"])
def test_a_refused_switch_gives_back_the_inode_numbers_it_took(model, tmp_path, case,
                                                                monkeypatch):
    """A warm switch whose fetch fails, or a checked one (the default) whose store lacks a chunk
    or does not answer: one MlfsError, the mount stays on its version, and the new tree's inode
    numbers go back."""
    store, base, _ = model
    ops, source, inodes = make_ops(store, version(base, store, 0), tmp_path, timeout=1.0)
    sw = Switcher(ops, source, inodes, invalidate=lambda p, n: None)
    broken = version(base, store, 1)
    warm = case.startswith("warm")
    if warm:
        store.fail.add(broken.files[-1].chunk_ids[0])
    elif "missing" in case:
        store.delete_chunk(broken.files[-1].chunk_ids[0])
    else:
        def refuse(key):
            raise StorePermissionError("access denied (injected)")
        monkeypatch.setattr(store, "_head", refuse)
    before = len(inodes)

    async def go(n):
        for _ in range(20):
            with pytest.raises(MlfsError):  # not a group of them: the control socket answers it
                await sw.switch_manifest(broken, warm=warm)
        assert ops.tree.manifest.version == "v0"
    run(go)
    assert len(inodes) == before


@pytest.mark.logs_bugs  # the injected RuntimeError is logged with its traceback, as a bug is
def test_supervised_task_is_counted_and_restarted(monkeypatch):
    from mlfs import config

    monkeypatch.setattr(config, "RESTART_DELAY", 0.01)
    sup = Supervisor()
    calls = []

    async def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("boom")  # a bug: logged with its traceback, counted
        if len(calls) < 4:
            raise StoreError("store down")  # ours: one line, counted

    trio.run(lambda: sup.run("flaky", flaky, delay=0.01))
    assert len(calls) == 4 and sup.errors == 3
    assert sup.snapshot()["last_background_error"] == "flaky: store down"


def test_control_socket_survives_clients_that_leave_stall_or_lie(model, tmp_path):
    """A client that sends a line and closes, one that closes at once, one that sends garbage or
    a huge line: each costs its own connection; a proper request afterwards still switches."""
    store, base, _ = model
    v1, v2 = version(base, store, 1), version(base, store, 2)
    ops, source, inodes = make_ops(store, v1, tmp_path)
    sup = Supervisor()
    sw = Switcher(ops, source, inodes, invalidate=lambda p, n: None)
    sock = str(tmp_path / "ctl.sock")
    path2 = tmp_path / "v2.json"
    path2.write_bytes(v2.dumps())

    async def client(payload: bytes, read: bool, hold: float = 0.0):
        s = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await s.connect(sock)
        try:
            while payload:
                payload = payload[await s.send(payload):]
        except OSError:
            pass  # a huge line: the mount stops reading, answers and closes
        await trio.sleep(hold)
        reply = b""
        if read:
            while not reply.endswith(b"\n"):
                chunk = await s.recv(65536)
                if not chunk:
                    break
                reply += chunk
        s.close()
        return reply

    async def go(n):
        sup.nursery = n
        sup.start("control socket", lambda: sw.serve_control(sock, record=sup.record), restart=True)
        while not os.path.exists(sock):
            await trio.sleep(0.01)
        import json
        req = json.dumps({"op": "switch", "path": str(path2)}).encode() + b"\n"
        await client(req, read=False)  # asks for a switch and leaves before the answer
        await client(b"", read=False)
        assert b'"ok": false' in await client(b"not json\n", read=True)
        assert b'"ok": false' in await client(b"[" * 200000 + b"\n", read=True)  # too deep
        assert b'"ok": false' in await client(b'{"op": "switch", "path": 7}\n', read=True)
        n.start_soon(lambda: client(b"x" * (2 << 20), False))
        n.start_soon(lambda: client(b'{"op": "sw', False, 3600))  # says half a line, then nothing
        await trio.sleep(0.3)
        assert ops.tree.manifest.version == "v2"  # the abandoned request still switched
        path1 = tmp_path / "v1.json"
        path1.write_bytes(v1.dumps())
        reply = await client(json.dumps({"op": "switch", "path": str(path1)}).encode() + b"\n", True)
        assert b'"ok": true' in reply and ops.tree.manifest.version == "v1"
    run(go)
    assert sup.errors == 0


def test_a_readers_miss_does_not_queue_behind_background_disk_loads(tmp_path):
    """A stream (background loads) keeps at most all but one disk slot, so a reader's own load
    starts at once instead of after the queue (docs/adr/0023)."""
    source = ChunkSource(None, ChunkCache(tmp_path / "cache", 1 << 30))
    done: list[str] = []

    def slow_disk(cid, size):
        time.sleep(0.1)
        return bytes(size)
    source._cache_get = slow_disk

    async def go(n):
        async def load(cid, background):
            await source.get(cid, 1000, background=background)
            done.append(cid)
        for i in range(9):
            n.start_soon(load, f"{i:064x}", True)
        await trio.sleep(0.02)  # every background load has taken a slot or queued for one
        await load("f" * 64, False)
        # It started at once, beside the first three: queued behind the nine it would have come
        # after seven or eight of them.
        assert len(done) <= 4, len(done)
    run(go)


def test_a_pushed_chunk_leaves_memory_once_the_disk_cache_has_it(model, tmp_path):
    """A chunk in the kernel's page cache (pushed by a stream) leaves the memory LRU, but a chunk
    from the store only after the disk cache admitted it: a read the page cache misses then
    loads it from disk, never with a second GET.  One the disk cache refused stays in memory;
    one loaded from the disk cache leaves at once (docs/adr/0024)."""
    store, m, blob = model
    ops, source, _ = make_ops(store, m, tmp_path)
    f = next(f for f in m.files if f.path == "blob.bin")
    (a, b), sizes = f.chunk_ids[:2], f.chunk_sizes
    writing = threading.Event()
    put = source.cache.put

    def held_put(cid, data):
        if cid == a:
            writing.wait(10)  # the disk is slow for chunk a
        return put(cid, data) if cid != b else False  # ... and refuses chunk b
    source.cache.put = held_put

    async def go(n):
        for cid, size in ((a, sizes[0]), (b, sizes[1])):
            await source.get(cid, size)
            source.drop_when_cached(cid)
        await until(lambda: source.counters.uncached_chunks == 1)
        source.drop_when_cached(b)
        assert source.peek(a) is not None  # not on disk yet: still the only copy here
        assert source.peek(b) is not None  # never on disk
        writing.set()
        await until(lambda: source.peek(a) is None)
        assert bytes(await source.get(a, sizes[0])) == blob[:sizes[0]]  # from the disk cache
        assert source.counters.disk_hits == 1
        source.drop_when_cached(a)  # came from disk: leaves at once
        assert source.peek(a) is None
        assert source.peek(b) is not None
    run(go)
    assert store.gets[a] == 1 and store.gets[b] == 1
    assert source.snapshot()["memory_bytes"] == sizes[1]


def test_a_few_pages_of_a_chunk_read_before_come_back_block_by_block(model, tmp_path):
    """Pages the kernel let go of (docs/adr/0026): a small read of a chunk that this mount
    fetched (its block checksums computed at admission) or read whole before, and that has left
    memory since, is answered from its blocks in the disk cache, byte for byte, without loading
    the chunk whole; a damaged block sends it the whole way (the seal then finds the damage and
    the chunk is fetched again)."""
    store, m, blob = model
    ops, source, _ = make_ops(store, m, tmp_path, memory_bytes=1 << 20)  # a chunk cannot stay
    f = next(f for f in m.files if f.path == "blob.bin")
    first = f.chunk_ids[0]

    async def go(n):
        ops.supervisor.nursery = n
        fh = await open_file(ops, "blob.bin")
        assert bytes(await ops.read(fh, 0, PIECE)) == blob[:PIECE]  # fetched, then read whole
        await until(lambda: source.cache.contains(first))
        source._forget(first)
        disk = source.counters.disk_hits
        assert bytes(await ops.read(fh, 0, 4096)) == blob[:4096]  # sums known since admission
        assert source.cache.part_reads == 1 and source.counters.disk_hits == disk
        source.cache._blocks.clear()  # as a new mount before the index has them
        assert bytes(await ops.read(fh, 0, 4096)) == blob[:4096]  # whole from disk: sums known
        assert source.counters.disk_hits == disk + 1
        source._forget(first)
        disk = source.counters.disk_hits
        for off, size in ((5, 4096), (131072 - 100, 300), (PIECE - 8192, 8192), (777777, 65536)):
            assert bytes(await ops.read(fh, off, size)) == blob[off:off + size], (off, size)
        assert source.cache.part_reads == 5 and source.counters.disk_hits == disk
        assert source.peek(first) is None  # nothing kept in memory for them

        raw = bytearray(source.cache.path(first).read_bytes())
        raw[300000] ^= 1
        source.cache.path(first).write_bytes(bytes(raw))
        gets = store.gets.get(first, 0)
        assert bytes(await ops.read(fh, 299000, 4096)) == blob[299000:303096]
        assert store.gets[first] == gets + 1 and source.cache.corrupt == 1
        assert source.cache.part_reads == 5
        await ops.release(fh)
    run(go)


def test_parts_of_cached_chunks_are_read_back_in_one_go_for_a_mend(tmp_path):
    """ChunkSource.get_parts (what Operations._mend reads, docs/adr/0034): parts of chunks in
    the disk cache, each checked by its blocks, or by the seal for a chunk too small to have
    block checksums; checksums only the index holds are loaded first; None for a chunk not
    cached or a block that does not match, never wrong bytes."""
    import blake3

    from mlfs.cache import SMALL_CHUNK

    cache = ChunkCache(tmp_path / "cache", 1 << 30)
    require(cache.trust_seals, "a shared cache directory: no block checksums")
    chunks = {}
    for size in (SMALL_CHUNK // 2, 1 << 20, 3 << 20):
        data = os.urandom(size)
        cid = blake3.blake3(data).hexdigest()
        assert cache.put(cid, data)
        chunks[cid] = data
    small, mid, big = chunks
    source = ChunkSource(None, ChunkCache(tmp_path / "cache", 1 << 30))  # a new mount
    assert not source.cache.has_blocks(mid) and not source.cache.has_blocks(small)
    raw = bytearray(source.cache.path(big).read_bytes())
    raw[2 << 20] ^= 1
    source.cache.path(big).write_bytes(bytes(raw))
    wanted = [(small, len(chunks[small]), 100, 4196), (mid, 1 << 20, 40000, 48192),
              (big, 3 << 20, 5000, 9096), (big, 3 << 20, (2 << 20) - 10, (2 << 20) + 4086),
              ("e" * 64, 4096, 0, 4096)]

    async def go(n):
        got = await source.get_parts(wanted)
        assert [None if g is None else bytes(g) for g in got] == [
            chunks[small][100:4196], chunks[mid][40000:48192], chunks[big][5000:9096], None, None]
    run(go)
    assert source.cache.part_reads == 2  # the small chunk was read whole


def test_small_block_reads_run_on_the_event_loop_until_one_is_slow(model, tmp_path, monkeypatch):
    """A block read of a page (docs/adr/0028) is done on the event loop while the disk cache has
    nothing else to do; once one takes longer than INLINE_SLOW, they go to worker threads, so
    that a disk in trouble cannot hold up every other request."""
    import threading

    from mlfs import fetch

    store, m, blob = model
    ops, source, _ = make_ops(store, m, tmp_path, memory_bytes=1 << 20)
    f = next(f for f in m.files if f.path == "blob.bin")
    first = f.chunk_ids[0]
    loop_thread = threading.get_ident()
    threads = []
    real = source.cache.get_part

    def spy(*args, **kwargs):
        threads.append(threading.get_ident())
        return real(*args, **kwargs)
    monkeypatch.setattr(source.cache, "get_part", spy)

    async def go(n):
        ops.supervisor.nursery = n
        fh = await open_file(ops, "blob.bin")
        assert bytes(await ops.read(fh, 0, PIECE)) == blob[:PIECE]
        await until(lambda: source.cache.contains(first))
        source._forget(first)
        assert bytes(await ops.read(fh, 0, 4096)) == blob[:4096]  # blocks: sums from admission
        source._forget(first)
        assert bytes(await ops.read(fh, 8192, 4096)) == blob[8192:12288]
        assert threads == [loop_thread, loop_thread]
        monkeypatch.setattr(fetch, "INLINE_SLOW", 0.0)  # every read is now "slow"
        assert bytes(await ops.read(fh, 20480, 4096)) == blob[20480:24576]  # inline, then back off
        assert bytes(await ops.read(fh, 40960, 4096)) == blob[40960:45056]
        assert threads[:3] == [loop_thread] * 3 and threads[3] != loop_thread
        assert source.cache.part_reads == 4
        await ops.release(fh)
    run(go)


def test_blocks_are_remembered_only_where_seals_are_trusted(tmp_path):
    """Where other users can write the cache every load is re-hashed with blake3 (ADR 0009); a
    block checksum would be a weaker check, so none is kept and reads load chunks whole."""
    import blake3

    data = os.urandom(PIECE)
    cid = blake3.blake3(data).hexdigest()
    cache = ChunkCache(tmp_path / "cache", 1 << 30)
    assert cache.put(cid, data)
    assert bytes(cache.get_part(cid, len(data), 0, 10)) == data[:10]  # computed at admission
    cache._blocks.clear()
    assert cache.get_part(cid, len(data), 0, 10) is None  # forgotten, not read whole since
    assert bytes(cache.get(cid, len(data))) == data
    assert bytes(cache.get_part(cid, len(data), 262140, 262150)) == data[262140:262150]
    cache.trust_seals = False
    cache._blocks.clear()
    assert bytes(cache.get(cid, len(data))) == data
    assert not cache.has_blocks(cid) and cache.get_part(cid, len(data), 0, 10) is None
    data2 = os.urandom(PIECE)
    cid2 = blake3.blake3(data2).hexdigest()
    assert cache.put(cid2, data2) and not cache.has_blocks(cid2)


class FakeKernel:
    """passthrough.Kernel as the daemon sees it, without a kernel: OPEN ids, backing files
    registered and closed, replies named for passthrough."""

    def __init__(self) -> None:
        self.active, self.stopped = True, None
        self.unique = 0
        self.registered: list = []
        self.closed: list[int] = []
        self.expected: list[tuple[int, int, int]] = []

    def open_unique(self) -> int:
        self.unique += 1
        return self.unique

    def register(self, path, size: int) -> int:
        assert os.path.getsize(path) == size
        self.registered.append(path)
        return len(self.registered)

    def unregister(self, backing: int) -> None:
        self.closed.append(backing)

    def expect(self, unique: int, fh: int, backing: int) -> None:
        self.expected.append((unique, fh, backing))

    def describe(self) -> str:
        return "on"


def test_opens_go_one_way_per_inode_and_pass_through_once_a_copy_exists(model, tmp_path,
                                                                        monkeypatch):
    """docs/adr/0035, the daemon's side: a file read whole through the daemon gets a whole copy
    once released; while a file of the inode is open through the daemon, new opens go that way
    too; then opens are passed through, all to one backing id, closed with the last of them."""
    import mlfs.fs

    monkeypatch.setattr(mlfs.fs, "WHOLE_QUIET", 0.05)  # the copy waits for reads to pause
    store, m, blob = model
    ops, source, _ = make_ops(store, m, tmp_path)
    kernel = ops.kernel = FakeKernel()

    async def read_all(fh: int) -> bytes:
        out = bytearray()
        while len(out) < len(blob):
            out += await ops.read(fh, len(out), 1 << 20)
        return bytes(out)

    async def go(n):
        ops.supervisor.nursery = n
        held = await open_file(ops, "blob.bin")  # no copy yet: through the daemon
        reader = await open_file(ops, "blob.bin")
        assert await read_all(reader) == blob
        await ops.release(reader)
        await until(lambda: ops.wholes.get("made") == 1)
        copy = source.cache.whole_file(next(f for f in m.files if f.path == "blob.bin").blake3)
        assert copy is not None and copy.read_bytes() == blob
        beside = await ops.open((await ops.lookup(ROOT_INODE, b"blob.bin")).st_ino, os.O_RDONLY, None)
        assert beside.keep_cache and not kernel.expected  # `held` is open through the daemon
        assert await read_all(beside.fh) == blob
        for fh in (held, beside.fh):
            await ops.release(fh)
        ino = (await ops.lookup(ROOT_INODE, b"blob.bin")).st_ino
        a = await ops.open(ino, os.O_RDONLY, None)
        b = await ops.open(ino, os.O_RDONLY, None)
        assert not a.keep_cache and not b.keep_cache
        assert [(fh, bid) for _, fh, bid in kernel.expected] == [(a.fh, 1), (b.fh, 1)]
        assert kernel.registered == [copy]  # one backing file for the inode
        entry = next(f for f in m.files if f.path == "blob.bin")
        # The copy took the place of the chunks' files; they are read from it (docs/adr/0037).
        assert not any(source.cache.has_file(c) for c in entry.chunk_ids)
        assert all(source.cache.contains(c) for c in entry.chunk_ids)
        small = await open_file(ops, "config.json")  # under 4 MiB: never passed through
        assert len(kernel.expected) == 2
        await ops.release(small)
        await ops.release(a.fh)
        assert kernel.closed == []
        await ops.release(b.fh)
        assert kernel.closed == [1]  # with the last one passed through
        assert ops.stats()["passthrough_opens"] == 2
    run(go)


def test_an_open_waits_for_the_copy_a_switch_is_writing(model, tmp_path, monkeypatch):
    """docs/adr/0036: the copy of a file a switch asked for is being written when a loader opens
    the file; the open waits for it and is passed through, rather than loading through the
    daemon beside the copy.  Were the copy slower than WHOLE_OPEN_WAIT, the open would go through
    the daemon."""
    from mlfs import passthrough

    store, m, blob = model
    ops, source, _ = make_ops(store, m, tmp_path)
    entry = next(f for f in m.files if f.path == "blob.bin")
    slow = passthrough.make_whole

    def make_whole(*a, **kw):
        time.sleep(0.3)
        return slow(*a, **kw)
    monkeypatch.setattr(passthrough, "make_whole", make_whole)

    async def go(n):
        ops.supervisor.nursery = n
        fh = await open_file(ops, "blob.bin")  # no kernel yet: the chunks cached, no copy asked
        assert await ops.read(fh, 0, len(blob)) == blob
        await ops.release(fh)
        kernel = ops.kernel = FakeKernel()
        assert ops.prepare_wholes([entry]) == [entry]
        assert ops.prepare_wholes([entry]) == []  # asked for once
        await until(lambda: ops.stats()["whole_files_pending"] == 1 and entry.blake3 in ops._whole_pending)
        ino = (await ops.lookup(ROOT_INODE, b"blob.bin")).st_ino
        fi = await ops.open(ino, os.O_RDONLY, None)
        assert ops.wholes == {"made": 1} and [fh for _, fh, _ in kernel.expected] == [fi.fh]
        await ops.release(fi.fh)
        assert kernel.closed == [1]
    run(go)
