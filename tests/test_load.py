"""Loads through a real mount that must never deadlock (issue 13): four processes loading the
same model through mmap at once, and a load inside a memory cgroup small enough that the page
cache is evicted under the loader mid-load.  Exact bytes every time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SAFE_OPEN_LOADER, generate_into, llm_shaped, require, wait_for

LOADER = SAFE_OPEN_LOADER


@pytest.fixture
def llm(tmp_path, store):
    """About 96 MiB in 48 tensors of 2 MiB (fp16 and fp32) and small norms."""
    man, _, want = llm_shaped(tmp_path, store, 24, 2)
    return man, want


def test_four_processes_load_through_mmap_at_once(llm, mounter, tmp_path):
    man, want = llm
    mnt = mounter("--manifest", man, "--cache-dir", tmp_path / "c", "--memory", "64M")
    procs = [subprocess.Popen([sys.executable, "-c", LOADER, str(mnt.mountpoint / "model.safetensors")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=180)  # a deadlock fails here
        assert p.returncode == 0, err
        assert json.loads(out) == want
    s = mnt.stats()
    assert s["fetch_errors"] == 0 and s["streamed_bytes"] > 0  # the load was recognised


def test_each_load_is_streamed_into_the_page_cache(llm, mounter, tmp_path):
    """A recognised load's chunks are pushed into the kernel's page cache (notify_store) ahead of
    the loader, whose page faults then find them there: most of the file never crosses a FUSE
    read.  A second load of the same file on the same mount (its pages dropped in between) is
    recognised and pushed again.  Exact bytes both times."""
    man, want = llm
    mnt = mounter("--manifest", man, "--cache-dir", tmp_path / "c", "--memory", "16M")
    path = mnt.mountpoint / "model.safetensors"
    size = path.stat().st_size
    for n in (1, 2):
        before = mnt.stats()
        p = subprocess.run([sys.executable, "-c", LOADER, str(path)], capture_output=True,
                           text=True, timeout=180)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout) == want
        s = mnt.stats()
        assert s["loads_recognised"] == n
        assert s["pushed_bytes"] - before["pushed_bytes"] > size / 2
        assert s["bytes_served"] - before["bytes_served"] < size / 2, (s, size)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the next load starts cold
        finally:
            os.close(fd)


def memory_cgroup(name: str, limit: int) -> tuple[Path, str]:
    """A memory cgroup of *limit* bytes (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``)."""
    v2 = Path("/sys/fs/cgroup")
    if (v2 / "cgroup.controllers").exists() and "memory" in (v2 / "cgroup.controllers").read_text():
        d = v2 / name
        d.mkdir(exist_ok=True)
        (d / "memory.max").write_text(str(limit))
        return d, "v2"
    v1 = Path("/sys/fs/cgroup/memory")
    require(v1.is_dir() and os.access(v1, os.W_OK), "no writable memory cgroup")
    d = v1 / name
    d.mkdir(exist_ok=True)
    (d / "memory.limit_in_bytes").write_text(str(limit))
    return d, "v1"


def test_load_completes_while_the_page_cache_is_evicted_under_it(llm, mounter, tmp_path):
    man, want = llm
    mnt = mounter("--manifest", man, "--cache-dir", tmp_path / "c")
    cg, version = memory_cgroup(f"mlfs-test-{os.getpid()}", 48 << 20)  # half the model
    try:
        def join() -> None:
            (cg / "cgroup.procs").write_text(str(os.getpid()))
        p = subprocess.run([sys.executable, "-c", LOADER, str(mnt.mountpoint / "model.safetensors")],
                           capture_output=True, text=True, timeout=300, preexec_fn=join)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout) == want
        peak = cg / ("memory.peak" if version == "v2" else "memory.max_usage_in_bytes")
        if peak.exists():
            assert int(peak.read_text()) <= 48 << 20  # the limit held: pages were evicted
    finally:
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                import time

                time.sleep(0.1)


# A partial reader: 10% of the tensors, in a random order, through safe_open (mmap underneath).
PARTIAL = """
import hashlib, json, random, sys
from safetensors import safe_open
out = {}
with safe_open(sys.argv[1], "np") as f:
    keys = sorted(f.keys())
    random.Random(int(sys.argv[2])).shuffle(keys)
    for k in keys[:len(keys) // 10]:
        out[k] = hashlib.sha256(f.get_tensor(k).tobytes()).hexdigest()
print(json.dumps(out))
"""


@pytest.mark.parametrize("seed", [5, 6])
def test_a_reader_of_a_few_tensors_fetches_them_and_their_edges_only(llm, mounter, tmp_path, seed):
    """Laziness through the kernel (docs/adr/0018): a page fault reads a window around it and
    read-ahead runs past the end of the tensor that was wanted, into its neighbours.  That spill
    may cost the neighbours' tail and head chunks, never the rest of them (before: the next
    tensor whole, and a 4 MiB piece for every spill)."""
    from mlfs import manifest as mf
    from mlfs.config import EDGE_HEAD, EDGE_TAIL

    man, want = llm
    entry = next(f for f in mf.loads(man.read_bytes()).files if f.path == "model.safetensors")
    mnt = mounter("--manifest", man, "--cache-dir", tmp_path / "c")
    before = mnt.stats()["bytes_fetched"]
    p = subprocess.run([sys.executable, "-c", PARTIAL, str(mnt.mountpoint / "model.safetensors"),
                        str(seed)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got and all(want[k] == v for k, v in got.items())
    fetched = mnt.stats()["bytes_fetched"] - before
    # Opening the file reads the header, and read-ahead past it the first tensor's head.
    header_end = entry.chunk_sizes[0]
    allowed = {i for i, o in enumerate(entry.offsets) if 0 < o < header_end + EDGE_HEAD}
    for k in got:
        b, e, _ = entry.tensors[k]
        allowed |= {i for i, (o, s) in enumerate(zip(entry.offsets, entry.chunk_sizes))
                    if o < e + EDGE_HEAD and o + s > b - EDGE_TAIL}
    picked = sum(entry.tensors[k][1] - entry.tensors[k][0] for k in got)
    assert 0 < fetched <= sum(entry.chunk_sizes[i] for i in allowed), (fetched, picked)
    assert mnt.stats()["streamed_bytes"] == 0  # not mistaken for a load


def test_a_warm_load_is_streamed_in_c_and_survives_damaged_and_missing_cache_files(
        llm, mounter, tmp_path):
    """A new mount over a cache that holds the model streams it with the C data plane
    (mlfs.dataplane, docs/adr/0029): exact bytes, most of them pushed by C.  One chunk file in the
    cache is damaged and another is gone: the stream hands both to the Python path, which removes
    the damaged one and fetches both from the store again."""
    from mlfs import dataplane
    from mlfs.cache import ChunkCache
    from mlfs.manifest import loads

    require(dataplane.NATIVE, "mlfs._dataplane is not built (needs a compiler and libxxhash-dev)")
    man, want = llm
    cache = tmp_path / "c"
    # Without passthrough: its whole copy would take the place of the chunk files (ADR 0037).
    cold = mounter("--manifest", man, "--cache-dir", cache, "--no-passthrough", name="cold")
    p = subprocess.run([sys.executable, "-c", LOADER, str(cold.mountpoint / "model.safetensors")],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0 and json.loads(p.stdout) == want, p.stderr
    cold.close()
    entry = next(f for f in loads(Path(man).read_bytes()).files if f.path == "model.safetensors")
    big = [c for c, s in zip(entry.chunk_ids, entry.chunk_sizes) if s > 1 << 20]
    c = ChunkCache(cache, 1 << 30)
    damaged, gone = c.path(big[len(big) // 3]), c.path(big[2 * len(big) // 3])
    raw = bytearray(damaged.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    gone.unlink()

    # Through the daemon: with passthrough the file would be read from its whole copy, made when
    # the cold mount ended, and no chunk file would be read (tests/test_passthrough.py).
    warm = mounter("--manifest", man, "--cache-dir", cache, "--no-passthrough", name="warm")
    path = warm.mountpoint / "model.safetensors"
    p = subprocess.run([sys.executable, "-c", LOADER, str(path)], capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == want
    s = warm.stats()
    assert s["streamed_in_c"] > path.stat().st_size / 2, s
    assert s["corrupt_cache_files"] == 1 and s["chunks_fetched"] >= 2 and s["fetch_errors"] == 0
    assert "in C" in warm.log.read_text()


# transformers' own loader, in a process of its own: every parameter's bytes, hashed.
TRANSFORMERS_LOADER = """
import hashlib, json, os, sys, torch
os.environ["HF_HUB_OFFLINE"] = "1"
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(json.dumps({k: hashlib.sha256(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
                  for k, v in m.state_dict().items()}))
"""


def test_a_sharded_checkpoint_loads_with_each_next_shard_fetched_ahead(store, mounter, tmp_path):
    """transformers writes a large checkpoint in shards and loads them one after the other.  Once
    the load of one shard is recognised, the mount fetches the next into the disk cache before
    the loader opens it (docs/adr/0033).  The parameters are the local copy's, and no chunk is
    fetched twice."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=4096)
    d = tmp_path / "llama"  # ~140 MiB in fp16: 2 and 5.5 MiB matrices
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(str(d), max_shard_size="40MB")
    shards = sorted(d.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and (d / "model.safetensors.index.json").exists()
    man = generate_into(store, d, "llama", "v1", tmp_path)
    mnt = mounter("--manifest", man, "--cache-dir", tmp_path / "c")

    def load(path):
        p = subprocess.run([sys.executable, "-c", TRANSFORMERS_LOADER, str(path)],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)
    assert load(mnt.mountpoint) == load(d)
    s = mnt.stats()
    assert s["fetch_errors"] == 0
    assert s["shards_ahead"] >= 1, {k: s[k] for k in ("loads_recognised", "shards_ahead",
                                                      "streamed_bytes", "prefetched_bytes")}
    assert s["bytes_fetched"] <= sum(p.stat().st_size for p in d.iterdir())


PAGE = os.sysconf("SC_PAGE_SIZE")


def load(path: Path, want: dict) -> None:
    p = subprocess.run([sys.executable, "-c", LOADER, str(path)], capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == want


class Holed:
    """The model through a mount, with a descriptor opened before anything was read (its own
    open found nothing to mend) that asks the kernel what the page cache holds (``mincore`` via
    mlfs.pagecache.Residency: no open, so no mend of its own, unlike ``fincore``)."""

    def __init__(self, mnt, want: dict) -> None:
        from mlfs.pagecache import Residency

        self.mnt, self.want = mnt, want
        self.path = mnt.mountpoint / "model.safetensors"
        self.size = self.path.stat().st_size
        self.fd = os.open(self.path, os.O_RDONLY)
        self.residency = Residency(self.fd, self.size)
        self.dropped: list[int] = []

    def held(self) -> int:
        """Pages of the file in the page cache."""
        return self.residency.resident().count(1)

    def load_and_drop(self, every: int = 37) -> None:
        """Load the model whole, then drop one page in *every* from the page cache, as memory
        pressure (or this VM's DAMON pageout scheme) does."""
        load(self.path, self.want)
        pages = -(-self.size // PAGE)
        wait_for(lambda: self.held() > pages * 0.95, what="the load's pages in")
        self.dropped = list(range(3, self.size // PAGE, every))
        for p in self.dropped:
            os.posix_fadvise(self.fd, p * PAGE, PAGE, os.POSIX_FADV_DONTNEED)
        assert self.held() <= pages - len(self.dropped) // 2

    def close(self) -> None:
        self.residency.close()
        os.close(self.fd)


def test_pages_the_kernel_let_go_of_are_put_back_when_the_file_is_opened_again(llm, mounter,
                                                                               tmp_path):
    """A file the page cache holds all but a few scattered pages of (it was loaded, then memory
    pressure took pages) is mended when a process opens it: the missing pages are read back from
    the disk cache, checked, and pushed at once (docs/adr/0034).  The next load then finds them
    in the page cache instead of asking for each in a FUSE read of its own.  Exact bytes."""
    man, want = llm
    h = Holed(mounter("--manifest", man, "--cache-dir", tmp_path / "c"), want)
    try:
        h.load_and_drop()
        before = h.mnt.stats()
        with open(h.path, "rb"):
            wait_for(lambda: h.mnt.stats()["mended_bytes"] - before["mended_bytes"]
                     >= len(h.dropped) * PAGE * 0.9, what="the holes filled")
        s = h.mnt.stats()
        assert s["mends"] == before["mends"] + 1
        assert h.held() > -(-h.size // PAGE) - len(h.dropped) // 4
        load(h.path, want)
        # Without the mend every dropped page is a FUSE read of at least a page (MLFS_MEND=0
        # fails here); the page cache may lose a few pages again meanwhile.
        assert h.mnt.stats()["bytes_served"] - s["bytes_served"] < len(h.dropped) * PAGE // 4
    finally:
        h.close()


def test_a_file_read_only_in_part_is_not_pulled_in_when_opened_again(llm, mounter, tmp_path):
    """Laziness: a file a reader took a few tensors of has most of its pages missing.  Those are
    not holes to fill (pagecache.MOSTLY): opening it again brings nothing."""
    man, want = llm
    mnt = mounter("--manifest", man, "--cache-dir", tmp_path / "c")
    path = mnt.mountpoint / "model.safetensors"
    h = Holed(mnt, want)
    try:
        p = subprocess.run([sys.executable, "-c", PARTIAL, str(path), "5"], capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        held = h.held()
        assert 0 < held < h.size / PAGE / 2
        with open(path, "rb"):
            import time

            time.sleep(1)
            assert h.held() <= held + 64  # nothing pushed (a page fault's read-around aside)
            load(path, want)  # a whole load after it: its open, too, finds nothing to mend
        s = mnt.stats()
        assert s["mends"] == 0 and s["mended_bytes"] == 0
    finally:
        h.close()


def test_a_damaged_block_under_a_hole_is_left_to_the_reader_and_fetched_again(llm, mounter,
                                                                              tmp_path):
    """A hole whose block in the disk cache does not match its checksum is not filled from it:
    the mend pushes the other holes, and the reader's own fault of that page finds the chunk
    file damaged (its seal), removes it and fetches the chunk from the store.  Exact bytes."""
    from mlfs.cache import ChunkCache
    from mlfs.manifest import loads

    man, want = llm
    h = Holed(mounter("--manifest", man, "--cache-dir", tmp_path / "c"), want)
    try:
        h.load_and_drop()
        entry = next(f for f in loads(Path(man).read_bytes()).files
                     if f.path == "model.safetensors")
        page = next(p for p in h.dropped[len(h.dropped) // 2:] if any(
            o <= p * PAGE and (p + 1) * PAGE <= o + s and s > 1 << 20
            for o, s in zip(entry.offsets, entry.chunk_sizes)))
        i = max(k for k, o in enumerate(entry.offsets) if o <= page * PAGE)
        damaged = ChunkCache(tmp_path / "c", 1 << 30).path(entry.chunk_ids[i])
        with open(damaged, "r+b") as f:
            at = page * PAGE - entry.offsets[i] + 100
            f.seek(at)
            b = f.read(1)
            f.seek(at)
            f.write(bytes([b[0] ^ 0xFF]))
        before = h.mnt.stats()
        with open(h.path, "rb"):
            wait_for(lambda: h.mnt.stats()["mended_bytes"] - before["mended_bytes"]
                     >= (len(h.dropped) - 1) * PAGE * 0.9, what="the other holes filled")
            assert h.residency.resident()[page] == 0  # not from the damaged block
            load(h.path, want)
        s = h.mnt.stats()
        assert s["corrupt_cache_files"] == before["corrupt_cache_files"] + 1
        assert s["chunks_fetched"] > before["chunks_fetched"] and s["fetch_errors"] == 0
    finally:
        h.close()


def test_a_mount_that_goes_away_while_it_mends_ends_cleanly(llm, mounter, tmp_path):
    """The mend runs beside the mount's own work; unmounting while it reads and pushes (one
    page in 9 dropped: 2,700 holes, 0.2-0.8 s of block reads here) ends the daemon promptly,
    with nothing in its log but the usual (the fixture fails the test on a traceback or an
    internal error).  The mend holds nothing open: the unmount does not wait for it."""
    man, want = llm
    mnt = mounter("--manifest", man, "--cache-dir", tmp_path / "c")
    h = Holed(mnt, want)
    try:
        h.load_and_drop(every=9)
        with open(h.path, "rb"):  # the holes are found in ~10 ms, then read back
            wait_for(lambda: mnt.stats()["mends"] == 1, what="the holes found")
    finally:
        h.close()
    subprocess.run(["fusermount3", "-u", str(mnt.mountpoint)], check=True)  # busy: fails
    assert mnt.proc.wait(30) == 0
