"""The load detector (mlfs.prefetch) alone, and driven through Operations under trio: a loader
streams the file, a reader that takes a few tensors does not pull the model."""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import pytest
import trio

from mlfs.cache import ChunkCache
from mlfs.fetch import ChunkSource
from mlfs.fs import Operations
from mlfs.generate import generate
from mlfs.manifest import FileEntry
from mlfs.prefetch import LOAD_RUN, START_RUN, LoadDetector, next_shard, stream_order
from mlfs.supervise import Supervisor
from mlfs.tree import ROOT_INODE, Inodes, Tree

MiB = 1 << 20


def entry(n: int = 40, size: int = 2 * MiB, small_every: int = 0, shuffle_names: bool = True) -> FileEntry:
    """A file of *n* tensors of *size* bytes (and small ones between, if asked), named so that
    name order differs from file order."""
    names = [f"t{i:03d}" for i in range(n)]
    if shuffle_names:
        random.Random(1).shuffle(names)
    tensors, pos = {}, 100
    for i, name in enumerate(names):
        tensors[name] = (pos, pos + size, "0" * 16)
        pos += size
        if small_every and i % small_every == 0:
            tensors[f"{name}.norm"] = (pos, pos + 4096, "0" * 16)
            pos += 4096
    return FileEntry("m.safetensors", pos, 0o644, "0" * 64, [], [], tensors)


def read_tensor(det: LoadDetector, e: FileEntry, name: str, spill: int = MiB, step: int = 128 << 10):
    """Read a tensor whole in read-ahead-sized requests, then spill into what follows."""
    b, end, _ = e.tensors[name]
    hit = False
    for off in range(b, end + spill, step):
        hit |= det.observe(off, min(off + step, e.size))
    return hit


@pytest.mark.parametrize("order", ["file", "name"])
def test_a_loader_is_recognised_after_a_run_of_tensors(order):
    e = entry(small_every=3)
    big = [n for n in e.tensors if not n.endswith(".norm")]
    seq = sorted(big, key=lambda n: e.tensors[n][0]) if order == "file" else sorted(big)
    det = LoadDetector(e)
    hits = [read_tensor(det, e, n) for n in seq]
    assert hits.index(True) == LOAD_RUN - 1 and hits.count(True) == 1
    assert det.order == order  # the stream then goes the loader's way


@pytest.mark.parametrize("order", ["file", "name"])
def test_a_loader_that_makes_every_tensor_first_is_recognised_by_their_starts(order):
    """safetensors.torch.load_file touches the first page of every tensor, then copies them: the
    kernel reads a window around each first page, and no tensor is finished until the copies."""
    e = entry(small_every=3)
    big = [n for n in e.tensors if not n.endswith(".norm")]
    seq = sorted(big, key=lambda n: e.tensors[n][0]) if order == "file" else sorted(big)
    det = LoadDetector(e)
    hits = [det.observe(max(0, e.tensors[n][0] - (128 << 10)), e.tensors[n][0] + (128 << 10))
            for n in seq]
    assert hits.index(True) == START_RUN - 1 and det.order == order
    assert det.by_starts  # then the stream brings every tensor's head first


def test_a_loader_finishing_tensors_is_not_taken_for_a_head_toucher():
    e = entry(small_every=3)
    det = LoadDetector(e)
    for n in sorted(e.tensors, key=lambda n: e.tensors[n][0]):
        if read_tensor(det, e, n):
            break
    assert det.loading and not det.by_starts


def test_the_stream_goes_in_the_loader_s_order():
    """Chunks by tensor name (a chunk shared by two tensors comes with the first), then what no
    tensor covers; or file order."""
    tensors = {"b": (10, 30, "0" * 16), "a": (30, 35, "0" * 16), "c": (35, 60, "0" * 16)}
    sizes = [10, 20, 10, 15, 5]  # header | b | a+c's start | c | c
    e = FileEntry("m.safetensors", 60, 0o644, "0" * 64, [str(i) * 64 for i in range(5)], sizes,
                  tensors)
    assert stream_order(e, "name") == [2, 1, 3, 4, 0]
    assert stream_order(e, "file") == [0, 1, 2, 3, 4]
    # A loader that touches every head before it copies: the heads (b, a, c start in chunks 1, 2,
    # 2) come first, in the loader's order, then the rest as before.
    assert stream_order(e, "file", heads_first=True) == [1, 2, 0, 3, 4]
    assert stream_order(e, "name", heads_first=True) == [2, 1, 3, 4, 0]
    assert sorted(stream_order(e, "file", heads_first=True)) == list(range(5))


def test_a_random_reader_taking_ten_percent_is_never_a_load():
    e = entry(n=300)
    big = list(e.tensors)
    rng = random.Random(7)
    triggered = 0
    for trial in range(200):
        det = LoadDetector(e)
        picks = rng.sample(big, 30)
        triggered += any(read_tensor(det, e, n) for n in picks)
    assert triggered == 0


def test_read_ahead_spill_does_not_finish_the_next_tensor():
    e = entry(n=20, shuffle_names=False)
    names = sorted(e.tensors, key=lambda n: e.tensors[n][0])
    for k in range(len(names) - 1):
        det = LoadDetector(e)
        read_tensor(det, e, names[k], spill=MiB)  # the kernel's largest read-ahead window
        assert det._finished == {k}


def test_files_with_few_large_tensors_are_left_to_the_lazy_path():
    det = LoadDetector(entry(n=3))
    assert not det.enabled and not det.observe(0, 1 << 30)


def test_the_next_shard_is_named_like_the_one_before():
    have = {"d/model-00002-of-00004.safetensors", "w-2-of-3.gguf", "pytorch_model-00010-of-00012.bin"}
    assert next_shard("d/model-00001-of-00004.safetensors", have.__contains__) == \
        "d/model-00002-of-00004.safetensors"
    assert next_shard("w-1-of-3.gguf", have.__contains__) == "w-2-of-3.gguf"  # llama.cpp splits
    assert next_shard("pytorch_model-00009-of-00012.bin", have.__contains__) == \
        "pytorch_model-00010-of-00012.bin"
    assert next_shard("d/model-00002-of-00004.safetensors", have.__contains__) is None  # not there
    assert next_shard("d/model-00004-of-00004.safetensors", lambda p: True) is None  # the last
    assert next_shard("model.safetensors", lambda p: True) is None
    assert next_shard("model-00001-of-00004.safetensors/x", lambda p: True) is None


# -- through Operations, no kernel -------------------------------------------------------------------
@pytest.fixture
def model(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {f"layer.{i:02d}.w": rng.standard_normal((1024, 512), dtype=np.float32)  # 2 MiB
               for i in range(40)}
    tensors.update({f"layer.{i:02d}.b": rng.standard_normal(512, dtype=np.float32) for i in range(40)})
    d = tmp_path / "m"
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"))
    from mlfs.stores import open_store

    store = open_store(str(tmp_path / "store"), create=True)
    m = generate(d, store, "m", "v1").manifest
    return store, m, (d / "model.safetensors").read_bytes()


def run_reads(store, m, tmp_path, reads, memory_bytes=256 << 20, watch=None, pause=0.0,
              passes=1, push=False):
    """Open the model, read the tensors *reads* in that order, let a stream finish, close it;
    *passes* times over (each pass a reader of its own).  *push*: the Operations push into the
    page cache, as a kernel session's do (the caller stands in for pyfuse3.notify_store)."""
    cache = ChunkCache(tmp_path / "cache", 1 << 30)
    source = ChunkSource(store, cache, memory_bytes=memory_bytes)
    ops = Operations(Tree.of(m, Inodes()), source, {}, inodes=None, supervisor=Supervisor(),
                     push=push)
    f = next(f for f in m.files if f.path == "model.safetensors")
    out = {}

    async def main():
        async with trio.open_nursery() as n:
            ops.supervisor.nursery = n
            attr = await ops.lookup(ROOT_INODE, b"model.safetensors")
            for _ in range(passes):
                streamed = source.counters.streamed_bytes
                fh = (await ops.open(attr.st_ino, os.O_RDONLY, None)).fh
                for name in reads:
                    b, e, _ = f.tensors[name]
                    got = b""
                    for off in range(b, e, 128 << 10):
                        got += bytes(await ops.read(fh, off, min(128 << 10, e - off)))
                        if watch:
                            watch(ops)
                        await trio.sleep(pause)  # a reader slower than the stream (it copies)
                    out[name] = got
                for _ in range(200):  # let a stream finish while the file is open
                    if (source.counters.streamed_bytes > streamed
                            or not ops.supervisor.nursery.child_tasks):
                        break
                    await trio.sleep(0.05)
                await ops.release(fh)
            n.cancel_scope.cancel()
    trio.run(main)
    return {**source.snapshot(), **ops.stats()}, f, out


def test_pushes_are_whole_pages_of_the_file(model, tmp_path):
    """The kernel keeps a pushed page only if one store fills it: every piece a stream pushes
    starts on a page, spans whole pages (or ends the file), and holds the file's bytes there.  A
    page shared with a neighbour not in memory is left out; with the neighbour in memory it is
    pushed whole."""
    from mlfs.fs import PAGE

    store, m, data = model
    f = next(f for f in m.files if f.path == "model.safetensors")
    source = ChunkSource(store, ChunkCache(tmp_path / "cache", 1 << 30))
    ops = Operations(Tree.of(m, Inodes()), source, {}, inodes=None, supervisor=Supervisor())
    unaligned = [i for i in range(1, len(f.chunk_ids) - 1)
                 if f.offsets[i] % PAGE and (f.offsets[i] + f.chunk_sizes[i]) % PAGE]
    assert unaligned
    for i in unaligned[:5]:
        off, end = f.offsets[i], f.offsets[i] + f.chunk_sizes[i]
        chunk = data[off:end]
        for neighbours in (False, True):
            source._lru.clear()
            if neighbours:
                for j in (i - 1, i + 1):
                    a = f.offsets[j]
                    source._remember(f.chunk_ids[j], data[a:a + f.chunk_sizes[j]])
            pieces = ops._pages(f, i, chunk)
            covered = set()
            for at, piece in pieces:
                assert at % PAGE == 0 and (len(piece) % PAGE == 0 or at + len(piece) == f.size)
                assert bytes(piece) == data[at:at + len(piece)]
                covered |= set(range(at // PAGE, (at + len(piece)) // PAGE))
            inner = set(range(-(-off // PAGE), end // PAGE))
            outer = set(range(off // PAGE, -(-end // PAGE)))
            assert covered == (outer if neighbours else inner)
    # A neighbour pushed earlier and gone from memory since left its part of the shared page
    # behind: the page is pushed whole, with the file's bytes, when this chunk comes.
    assert len(unaligned) >= 10
    for i in unaligned[5:10]:
        source._lru.clear()
        ops._remnants.clear()
        for j in (i - 1, i + 1):
            a = f.offsets[j]
            ops._pages(f, j, data[a:a + f.chunk_sizes[j]])  # pushed alone: its edge pages kept
        source._lru.clear()
        off, end = f.offsets[i], f.offsets[i] + f.chunk_sizes[i]
        pieces = ops._pages(f, i, data[off:end])
        covered = set()
        for at, piece in pieces:
            assert bytes(piece) == data[at:at + len(piece)]
            covered |= set(range(at // PAGE, (at + len(piece)) // PAGE))
        assert covered == set(range(off // PAGE, -(-end // PAGE)))


def test_a_read_of_a_page_shared_with_a_neighbour_is_answered_from_the_remnant(model, tmp_path):
    """A chunk pushed while its neighbour was not in memory keeps its part of the shared page
    (a remnant).  When the loader then faults that page in (it touches the next tensor's head
    before the stream has brought the tensor before it), the read takes the chunk's part from the
    remnant: the chunk, gone from memory since its push, is neither read from the disk cache nor
    fetched (in a cold load of the benchmark's model that was ~80 whole-chunk reads)."""
    from mlfs.fs import PAGE

    store, m, data = model
    f = next(f for f in m.files if f.path == "model.safetensors")
    source = ChunkSource(store, ChunkCache(tmp_path / "cache", 1 << 30))
    ops = Operations(Tree.of(m, Inodes()), source, {}, inodes=None, supervisor=Supervisor())
    heads = [i for i in range(1, len(f.chunk_ids)) if f.offsets[i] % PAGE
             and f.chunk_sizes[i] > PAGE]
    assert len(heads) >= 9
    asked = []
    real_get = source.get

    async def get(cid, size, **kw):
        asked.append(cid)
        return await real_get(cid, size, **kw)
    source.get = get

    async def main():
        attr = await ops.lookup(ROOT_INODE, b"model.safetensors")
        fh = (await ops.open(attr.st_ino, os.O_RDONLY, None)).fh
        for i in heads[::4][:3]:
            off = f.offsets[i]
            source._lru.clear()
            ops._remnants.clear()
            ops._pages(f, i, data[off:off + f.chunk_sizes[i]])  # pushed alone: remnant kept
            page = off // PAGE * PAGE
            hits = source.counters.memory_hits
            # The page's part in chunk i, and the whole page (its part in chunk i - 1 is fetched).
            assert bytes(await ops.read(fh, off, page + PAGE - off)) == data[off:page + PAGE]
            assert source.counters.memory_hits == hits + 1
            assert f.chunk_ids[i] not in asked
            assert bytes(await ops.read(fh, page, PAGE)) == data[page:page + PAGE]
            assert f.chunk_ids[i] not in asked and f.chunk_ids[i - 1] in asked
            # A read reaching past the remnant needs the chunk itself.
            assert bytes(await ops.read(fh, off, page + 2 * PAGE - off)) == \
                data[off:page + 2 * PAGE]
            assert f.chunk_ids[i] in asked
        await ops.release(fh)
    trio.run(main)


def test_a_partial_reader_fetches_little_more_than_its_tensors(model, tmp_path):
    store, m, data = model
    f = next(f for f in m.files if f.path == "model.safetensors")
    names = sorted(n for n in f.tensors if n.endswith(".w"))
    picks = random.Random(3).sample(names, 4)  # 10% of the large tensors, random order
    stats, f, out = run_reads(store, m, tmp_path, picks)
    for name in picks:
        b, e, _ = f.tensors[name]
        assert out[name] == data[b:e]
    wanted = sum(f.tensors[n][1] - f.tensors[n][0] for n in picks) + f.chunk_sizes[0]
    assert stats["streamed_bytes"] == 0
    assert stats["bytes_fetched"] <= 1.5 * wanted + (4 << 20), (stats["bytes_fetched"], wanted)


def test_a_key_order_load_streams_the_whole_file(model, tmp_path):
    store, m, data = model
    f = next(f for f in m.files if f.path == "model.safetensors")
    first = sorted(n for n in f.tensors if n.endswith(".w"))[:LOAD_RUN]
    stats, f, out = run_reads(store, m, tmp_path, first)
    assert stats["streamed_bytes"] > 0
    assert stats["bytes_fetched"] == sum(dict(zip(f.chunk_ids, f.chunk_sizes)).values())


def test_each_load_of_a_file_is_recognised_not_only_the_first(model, tmp_path):
    """A long-lived mount: a server loads the model, restarts, loads it again (from the disk cache,
    its memory long reused).  The second load must be streamed too; the detector used to stay
    "loading" for good after the first."""
    store, m, data = model
    f = next(f for f in m.files if f.path == "model.safetensors")
    names = sorted(n for n in f.tensors if n.endswith(".w"))
    stats, f, out = run_reads(store, m, tmp_path, names, memory_bytes=8 << 20, passes=2)
    assert all(out[n] == data[f.tensors[n][0]:f.tensors[n][1]] for n in names)
    assert stats["loads_recognised"] == 2
    assert stats["disk_hits"] > 0  # the second load came from the disk cache, streamed


def test_a_stream_stays_within_half_the_memory_budget_ahead_of_the_reader(model, tmp_path):
    """A stream running away from its reader pushed chunks out of memory before their turn (read
    twice); it now waits while what it brought and no read asked for exceeds half the budget."""
    store, m, data = model
    f = next(f for f in m.files if f.path == "model.safetensors")
    names = sorted(n for n in f.tensors if n.endswith(".w"))
    memory = 48 << 20  # the model is 84 MB
    lead = max(memory // 2, 12 * max(f.chunk_sizes))
    seen = []

    def watch(ops):
        for s in ops._streams.values():
            seen.append(s.pending_bytes)
    stats, f, out = run_reads(store, m, tmp_path, names, memory_bytes=memory, watch=watch,
                              pause=0.002)
    assert all(out[n] == data[f.tensors[n][0]:f.tensors[n][1]] for n in names)
    assert stats["streamed_bytes"] > 0
    # Every chunk came from the store once and was used from memory: none was pushed out
    # before its turn and read again from the disk cache.
    assert stats["chunks_fetched"] == len(set(f.chunk_ids)) and stats["disk_hits"] == 0
    assert seen and max(seen) <= lead


def test_a_head_toucher_gets_every_head_first_then_the_rest(model, tmp_path, monkeypatch):
    """safetensors.torch.load_file's way: the first page of every tensor in file order, then a copy
    of each.  Recognised by its starts, a cold stream brings the remaining heads before any other
    chunk, so that the copies run beside the rest of the stream.  From a warm disk cache the
    stream outruns the copies: it goes in file order.  The bytes are exact either way."""
    import mlfs.fs

    store, m, data = model
    f = next(f for f in m.files if f.path == "model.safetensors")
    orders = []

    def recording(entry, order, heads_first=False):
        seq = stream_order(entry, order, heads_first)
        orders.append((order, heads_first, seq))
        return seq
    monkeypatch.setattr(mlfs.fs, "stream_order", recording)
    cache = ChunkCache(tmp_path / "cache", 1 << 30)
    by_file = sorted(f.tensors, key=lambda n: f.tensors[n][0])

    def load() -> dict:
        source = ChunkSource(store, cache)  # a fresh mount: nothing in memory
        ops = Operations(Tree.of(m, Inodes()), source, {}, inodes=None, supervisor=Supervisor())
        out = {}

        async def main():
            async with trio.open_nursery() as n:
                ops.supervisor.nursery = n
                attr = await ops.lookup(ROOT_INODE, b"model.safetensors")
                fh = (await ops.open(attr.st_ino, os.O_RDONLY, None)).fh
                for name in by_file:  # pass 1: make every tensor (its first page)
                    await ops.read(fh, f.tensors[name][0], 4096)
                for name in by_file:  # pass 2: copy each
                    b, e, _ = f.tensors[name]
                    out[name] = b"".join([bytes(await ops.read(fh, off, min(128 << 10, e - off)))
                                          for off in range(b, e, 128 << 10)])
                await ops.release(fh)
                n.cancel_scope.cancel()
        trio.run(main)
        source.flush()  # every chunk read is in the disk cache now
        return out

    for _ in range(2):
        out = load()
        assert all(out[n] == data[f.tensors[n][0]:f.tensors[n][1]] for n in by_file)
    assert len(orders) == 2
    (order, heads_first, seq), (warm_order, warm_heads_first, warm_seq) = orders
    assert order == "file" and heads_first
    heads = {max(i for i, o in enumerate(f.offsets) if o <= b) for b, _, _ in f.tensors.values()}
    assert set(seq[:len(heads)]) == heads
    assert warm_order == "file" and not warm_heads_first and warm_seq == sorted(warm_seq)


def test_a_file_with_a_chunk_larger_than_native_max_chunk_is_streamed_in_python(model, tmp_path):
    """The C stream's threads each hold a buffer as large as the file's largest chunk, outside
    the memory budget; a manifest may name chunks of up to 64 MiB, so such files stream in
    Python, within the budget (docs/adr/0029)."""
    from dataclasses import replace

    from conftest import require
    from mlfs import dataplane, fs

    require(dataplane.NATIVE, "mlfs._dataplane is not built")
    store, m, _ = model
    f = next(f for f in m.files if f.path == "model.safetensors")
    source = ChunkSource(store, ChunkCache(tmp_path / "cache", 1 << 30))
    require(source.cache.trust_seals and source.cache.direct_reads, "no O_DIRECT here")
    ops = Operations(Tree.of(m, Inodes()), source, {}, inodes=None, supervisor=Supervisor())
    ops.fuse_fd, ops.push = 99, True  # as a kernel session would have them
    assert ops._native(True, f) and not ops._native(False, f)
    sizes = list(f.chunk_sizes)
    sizes[-1] = fs.NATIVE_MAX_CHUNK + 1
    assert not ops._native(True, replace(f, chunk_sizes=sizes, offsets=[]))
    sizes[-1] = fs.NATIVE_MAX_CHUNK
    assert ops._native(True, replace(f, chunk_sizes=sizes, offsets=[]))


def _pushes(monkeypatch) -> list[tuple[int, bytes]]:
    """Where pyfuse3.notify_store's pushes go instead: ``(offset, bytes)`` in call order."""
    import pyfuse3

    pushes: list[tuple[int, bytes]] = []
    monkeypatch.setattr(pyfuse3, "notify_store",
                        lambda inode, offset, data: pushes.append((offset, bytes(data))))
    return pushes


def test_read_ahead_pushes_the_rest_of_a_tensor_into_the_page_cache(model, tmp_path, monkeypatch):
    """A reader deep in a tensor gets the rest of it fetched at once (Operations._tensor_ahead);
    those chunks are pushed into the page cache too, so its next faults are no round trips
    (docs/adr/0032).  Only that tensor's chunks, with the file's bytes."""
    store, m, data = model
    f = next(f for f in m.files if f.path == "model.safetensors")
    name = sorted(n for n in f.tensors if n.endswith(".w"))[7]  # one tensor: no load
    b, e, _ = f.tensors[name]
    pushes = _pushes(monkeypatch)
    stats, f, _ = run_reads(store, m, tmp_path, [name], push=True)
    assert stats["streamed_bytes"] == 0 and pushes
    for offset, piece in pushes:
        assert piece == data[offset:offset + len(piece)]
        assert b - 4096 <= offset and offset + len(piece) <= e + 4096, (offset, b, e)
    # past its first MiB (SPILL, then the rest of the chunk that reaches) the tensor was pushed
    covered = set()
    for offset, piece in pushes:
        covered.update(range(offset // 4096, (offset + len(piece)) // 4096))
    deep = range(-(-(b + (1 << 20)) // 4096), e // 4096)
    assert set(deep) <= covered


def test_a_stream_does_not_push_again_what_read_ahead_pushed(model, tmp_path, monkeypatch):
    """A key-order load: read-ahead pushes the rest of each tensor it is deep in until the load
    is recognised, then the stream brings the rest of the file and passes those chunks by.
    Every byte pushed is the file's, and no chunk's pages are pushed twice."""
    store, m, data = model
    f = next(f for f in m.files if f.path == "model.safetensors")
    names = sorted(n for n in f.tensors if n.endswith(".w"))[:LOAD_RUN + 2]
    pushes = _pushes(monkeypatch)
    stats, f, _ = run_reads(store, m, tmp_path, names, push=True)
    assert stats["loads_recognised"] == 1 and stats["streamed_bytes"] > 0
    for offset, piece in pushes:
        assert piece == data[offset:offset + len(piece)]
    bodies = [offset for offset, piece in pushes if len(piece) > 4096]  # not shared edge pages
    assert len(bodies) == len(set(bodies)), "a chunk was pushed twice"


@pytest.fixture
def shards(tmp_path):
    """A checkpoint in three shards (``model-0000k-of-00003.safetensors``), as transformers
    writes large ones, and a config."""
    from safetensors.numpy import save_file

    from mlfs.stores import open_store

    rng = np.random.default_rng(1)
    d = tmp_path / "sharded"
    d.mkdir()
    data = {}
    for k in range(1, 4):
        tensors = {f"layer.{k}.{i:02d}.w": rng.standard_normal((1024, 512), dtype=np.float32)
                   for i in range(12)}  # 2 MiB each
        tensors.update({f"layer.{k}.{i:02d}.b": rng.standard_normal(512, dtype=np.float32)
                        for i in range(12)})
        name = f"model-{k:05d}-of-00003.safetensors"
        save_file(tensors, str(d / name))
        data[name] = (d / name).read_bytes()
    (d / "config.json").write_text("{}")
    store = open_store(str(tmp_path / "store"), create=True)
    return store, generate(d, store, "m", "v1").manifest, data


def load_shards(store, m, data, tmp_path, plan, settle=True):
    """Read whole tensors of files in turn: *plan* is ``[(path, [tensor names])]``.  After each
    file, background work (its stream, the next shard's fetch) is let finish before the file is
    closed (*settle*; else the next file is opened at once and the work goes on beside its
    reads, and only the last file waits for it).  Every byte read is checked against *data*
    (path → the file's bytes).  Returns the Operations and, per file, the bytes of its chunks
    the disk cache lacked when it was opened."""
    cache = ChunkCache(tmp_path / "cache", 1 << 30)
    source = ChunkSource(store, cache, memory_bytes=64 << 20)
    ops = Operations(Tree.of(m, Inodes()), source, {}, inodes=None, supervisor=Supervisor())
    missing = {}

    async def main():
        async with trio.open_nursery() as n:
            ops.supervisor.nursery = n
            for path, names in plan:
                f = next(f for f in m.files if f.path == path)
                missing[path] = sum(size for c, size in zip(f.chunk_ids, f.chunk_sizes)
                                    if not cache.contains(c))
                attr = await ops.lookup(ROOT_INODE, path.encode())
                fh = (await ops.open(attr.st_ino, os.O_RDONLY, None)).fh
                for name in names:
                    b, e, _ = f.tensors[name]
                    for off in range(b, e, 128 << 10):
                        got = bytes(await ops.read(fh, off, min(128 << 10, e - off)))
                        assert got == data[path][off:off + len(got)]
                # The stream and the fetch ahead, and their disk cache writes; the file open.
                for _ in range(400 if settle or path == plan[-1][0] else 0):
                    if not n.child_tasks and not source.snapshot()["cache_writes_pending"]:
                        break
                    await trio.sleep(0.02)
                await ops.release(fh)
            n.cancel_scope.cancel()
    trio.run(main)
    source.flush()  # every fetched chunk offered to the disk cache
    return ops, missing


def _file(m, path):
    return next(f for f in m.files if f.path == path)


def _in_file_order(m, path):
    """The tensors of *path*, in the order a ``load_file``-style loader finishes them."""
    tensors = _file(m, path).tensors
    return sorted(tensors, key=lambda n: tensors[n][0])


def test_a_shard_s_load_fetches_the_next_shard_ahead_of_it(shards, tmp_path):
    """A loader taking shard 1 whole: once its load is recognised and streamed, shard 2 comes
    into the disk cache before the loader opens it — and only shard 2 (one shard ahead).  The
    load of shard 2 then fetches nothing, and fetches shard 3 ahead in turn."""
    store, m, data = shards
    s1, s2, s3 = sorted(data)
    ops, _ = load_shards(store, m, data, tmp_path, [(s1, _in_file_order(m, s1))])
    cache = ops.source.cache
    assert ops.loads_recognised == 1 and ops.shards_ahead == 1
    assert all(cache.contains(c) for c in _file(m, s2).chunk_ids)
    assert not any(cache.contains(c) for c in _file(m, s3).chunk_ids)
    assert ops.stats()["prefetched_bytes"] >= 0.9 * len(data[s2])

    shutil.rmtree(tmp_path / "cache")
    ops, missing = load_shards(store, m, data, tmp_path, [(s1, _in_file_order(m, s1)),
                                                           (s2, _in_file_order(m, s2))])
    assert missing[s1] > 0 and missing[s2] == 0  # all of shard 2 was there when the loader came
    assert ops.loads_recognised == 2 and ops.shards_ahead == 2
    assert all(ops.source.cache.contains(c) for c in _file(m, s3).chunk_ids)


def test_a_loader_opening_the_next_shard_while_it_is_fetched_ahead_reads_exact_bytes(
        shards, tmp_path):
    """The loader goes on to shard 2 at once: its load is recognised while the fetch ahead still
    runs, and its stream takes over (waiting for the chunks in flight).  Exact bytes, and no
    chunk of the checkpoint is fetched twice."""
    store, m, data = shards
    ops, _ = load_shards(store, m, data, tmp_path, [(p, _in_file_order(m, p)) for p in sorted(data)],
                         settle=False)
    assert ops.loads_recognised == 3
    chunks = {c: n for f in m.files if f.path in data for c, n in zip(f.chunk_ids, f.chunk_sizes)}
    assert ops.source.counters.bytes_fetched == sum(chunks.values())  # each chunk once


def test_the_fetch_ahead_stops_at_the_first_chunk_the_store_lacks(shards, tmp_path, caplog):
    """A store that lost chunks of shard 2: the fetch ahead says so once and stops (the read
    that needs a lost chunk reports it), instead of a warning per chunk."""
    store, m, data = shards
    s1, s2, _ = sorted(data)
    f2 = _file(m, s2)
    lost = f2.chunk_ids[len(f2.chunk_ids) // 2:]
    for cid in lost:
        store.delete_chunk(cid)
    ops, _ = load_shards(store, m, data, tmp_path, [(s1, _in_file_order(m, s1))])
    warned = [r for r in caplog.records if "ahead of its load" in r.getMessage()]
    assert len(warned) == 1 and "stopped" in warned[0].getMessage()
    assert ops.shards_ahead == 1  # what came before the loss is in the disk cache
    assert all(ops.source.cache.contains(c) for c in f2.chunk_ids[:2])
    # Fetches in flight when the first one failed still end; nothing is started after it.
    assert ops.source.counters.fetch_errors <= 12  # STREAM_CONCURRENCY


def test_a_reader_taking_a_few_tensors_of_a_shard_does_not_pull_the_next(shards, tmp_path):
    store, m, data = shards
    s1, s2, _ = sorted(data)
    picks = random.Random(2).sample([n for n in _file(m, s1).tensors if n.endswith(".w")], 3)
    ops, _ = load_shards(store, m, data, tmp_path, [(s1, picks)])
    assert ops.loads_recognised == 0 and ops.shards_ahead == 0
    assert not any(ops.source.cache.contains(c) for c in _file(m, s2).chunk_ids)


def test_without_next_shard_the_shards_are_fetched_only_when_read(shards, tmp_path, monkeypatch):
    """With the fetch ahead off (``MLFS_NEXT_SHARD=0``, the A/B switch) the same load leaves
    shard 2 alone: the tests above see the fetch ahead, not the stream of shard 1."""
    import mlfs.fs

    monkeypatch.setattr(mlfs.fs, "NEXT_SHARD", False)
    store, m, data = shards
    s1, s2, _ = sorted(data)
    ops, _ = load_shards(store, m, data, tmp_path, [(s1, _in_file_order(m, s1))])
    assert ops.loads_recognised == 1 and ops.shards_ahead == 0
    assert not any(ops.source.cache.contains(c) for c in _file(m, s2).chunk_ids)
