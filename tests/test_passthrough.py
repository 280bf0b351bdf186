"""Whole copies of files read whole, and later opens passed through to them by the kernel
(docs/adr/0035).  Real mounts for the kernel's side; the routing rule and the copy's checks
in-process below them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import SAFE_OPEN_LOADER, generate_into, llm_shaped, run_mlfs, sha, wait_for
from mlfs import passthrough
from mlfs.cache import ChunkCache
from mlfs.manifest import FileEntry

LOADER = SAFE_OPEN_LOADER


@pytest.fixture
def model(tmp_path, store):
    """About 40 MiB in 30 tensors (fp16, fp32, small norms), written by safetensors."""
    return llm_shaped(tmp_path, store, 10, 5, model_id="pt")


def load(path: Path) -> dict:
    p = subprocess.run([sys.executable, "-c", LOADER, str(path)], capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def drop_pages(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def wholes(mnt, kind: str) -> int:
    return mnt.stats()["whole_files"].get(kind, 0)


def copied(mounter, man, src: Path, cache: Path):
    """A mount of *man* whose model file was read whole once and then copied whole."""
    mnt = mounter("--manifest", man, "--cache-dir", cache)
    path = mnt.mountpoint / "model.safetensors"
    assert sha(path) == sha(src)
    wait_for(lambda: wholes(mnt, "made") == 1, what="the whole copy")
    return mnt, path


def test_a_file_read_whole_is_passed_through_at_its_next_open(model, mounter, tmp_path):
    man, src, want = model
    cache = tmp_path / "c"
    mnt, path = copied(mounter, man, src, cache)
    copies = list((cache / "files").iterdir())
    assert len(copies) == 1 and sha(copies[0]) == sha(src)
    before = mnt.stats()
    assert before["passthrough"] == "on" and before["passthrough_opens"] == 0
    for _ in range(2):  # from the disk, then from the copy's page cache
        drop_pages(path)
        assert load(path) == want
        assert sha(path) == sha(src)
    after = mnt.stats()
    assert after["passthrough_opens"] >= 4
    # The kernel served every byte: not one read reached the daemon.
    assert after["bytes_served"] == before["bytes_served"]
    assert after["whole_files"]["made"] == 1


def test_a_copy_asked_for_at_unmount_is_made_and_used_by_the_next_mount(model, mounter,
                                                                          tmp_path):
    """A load's release often comes just before an unmount: the copy is still made, as the
    daemon ends, and the next mount of the cache passes the file through, whatever has happened
    to the chunk files since."""
    man, src, want = model
    cache = tmp_path / "c"
    first = mounter("--manifest", man, "--cache-dir", cache, name="first")
    assert load(first.mountpoint / "model.safetensors") == want
    first.close()  # at once: no waiting for the copy
    assert first.proc.returncode == 0
    assert len(list((cache / "files").iterdir())) == 1
    for chunk in (p for p in (cache / "chunks").rglob("*") if p.is_file()):
        chunk.write_bytes(b"damaged")  # the copy was checked when made; these are not read
    second = mounter("--manifest", man, "--cache-dir", cache, name="second")
    path = second.mountpoint / "model.safetensors"
    drop_pages(path)
    assert load(path) == want and sha(path) == sha(src)
    s = second.stats()
    assert s["passthrough_opens"] >= 2 and s["bytes_served"] == 0
    assert s["corrupt_cache_files"] == 0


def test_a_file_read_in_part_gets_no_copy(model, mounter, tmp_path):
    man, src, _ = model
    cache = tmp_path / "c"
    mnt = mounter("--manifest", man, "--cache-dir", cache)
    with open(mnt.mountpoint / "model.safetensors", "rb") as f:
        f.seek(20 << 20)
        assert f.read(1 << 20) == src.read_bytes()[20 << 20:21 << 20]
    wait_for(lambda: wholes(mnt, "partial") >= 1, what="the copy to be considered")
    s = mnt.stats()
    assert "made" not in s["whole_files"] and s["passthrough_opens"] == 0
    assert not any((cache / "files").glob("*"))


def test_open_files_keep_their_way_and_later_opens_change_it(model, mounter, tmp_path):
    """The kernel refuses an open that mixes the FUSE page cache and passthrough on one inode:
    while a file is open through the daemon, new opens go that way too, even with a copy made;
    once none is, they are passed through, all to one backing file."""
    man, src, want = model
    mnt = mounter("--manifest", man, "--cache-dir", tmp_path / "c")
    path = mnt.mountpoint / "model.safetensors"
    held = open(path, "rb")  # through the daemon: no copy yet
    try:
        assert sha(path) == sha(src)  # a second open, the same way; its release makes the copy
        wait_for(lambda: wholes(mnt, "made") == 1, what="the whole copy")
        assert load(path) == want  # mapped, while `held` is open: still through the daemon
        assert mnt.stats()["passthrough_opens"] == 0
        assert held.read() == src.read_bytes()
    finally:
        held.close()
    wait_for(lambda: mnt.stats()["open_files"] == 0, what="the release")
    procs = [subprocess.Popen([sys.executable, "-c", LOADER, str(path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    with open(path, "rb") as f:  # passed through, beside the loaders
        assert f.read() == src.read_bytes()
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        assert json.loads(out) == want
    assert mnt.stats()["passthrough_opens"] >= 5


def test_a_damaged_chunk_is_fetched_again_before_a_copy_is_made(model, mounter, tmp_path):
    man, src, want = model
    cache = tmp_path / "c"
    mnt = mounter("--manifest", man, "--cache-dir", cache)
    path = mnt.mountpoint / "model.safetensors"
    with open(path, "rb") as f:
        assert f.read() == src.read_bytes()
        # Before the release that would copy it: damage a 4 MiB chunk file in the cache.
        victim = max((p for p in (cache / "chunks").rglob("*") if p.is_file()),
                     key=lambda p: p.stat().st_size)
        raw = bytearray(victim.read_bytes())
        raw[1000] ^= 0xFF
        victim.write_bytes(bytes(raw))
    wait_for(lambda: wholes(mnt, "partial") >= 1, what="the copy to be refused")
    assert wholes(mnt, "made") == 0 and mnt.stats()["corrupt_cache_files"] >= 1
    drop_pages(path)
    assert load(path) == want  # the damaged chunk is fetched again; this load's release copies
    wait_for(lambda: wholes(mnt, "made") == 1, what="the whole copy")
    drop_pages(path)
    assert sha(path) == sha(src)
    assert mnt.stats()["passthrough_opens"] >= 1


def test_a_copy_gone_from_the_disk_leaves_open_files_reading(model, mounter, tmp_path):
    """The kernel holds the backing file: a copy removed (by hand, or evicted) while open keeps
    serving its bytes; the next open goes through the daemon, which fetches the chunks that
    went with the copy (docs/adr/0037); a load of them all writes the copy again."""
    man, src, want = model
    cache = tmp_path / "c"
    mnt, path = copied(mounter, man, src, cache)
    with open(path, "rb") as f:
        assert mnt.stats()["passthrough_opens"] == 1
        for copy in (cache / "files").iterdir():
            copy.unlink()
        drop_pages(path)
        assert f.read() == src.read_bytes()
    wait_for(lambda: mnt.stats()["open_files"] == 0, what="the release")
    opens = mnt.stats()["passthrough_opens"]
    drop_pages(path)  # the first load's pages, kept by the kernel for the daemon's file
    assert load(path) == want
    assert mnt.stats()["passthrough_opens"] == opens  # the copy is gone: through the daemon
    mnt.close()  # (it holds some chunks in memory, which it does not write to the disk again)
    again = mounter("--manifest", man, "--cache-dir", cache, name="again")
    assert sha(again.mountpoint / "model.safetensors") == sha(src)
    wait_for(lambda: wholes(again, "made") == 1, what="the copy written again")
    assert sha(next((cache / "files").iterdir())) == sha(src)


def test_a_copy_takes_the_place_of_its_chunks_in_a_cache_it_fills(model, mounter, tmp_path):
    """docs/adr/0037: with a cache 1.5 times the file, the copy still fits: it replaces the
    chunk files, and the file's chunks are read from it (the cache's index says where), with
    nothing fetched again."""
    man, src, _ = model
    size = src.stat().st_size
    cache = tmp_path / "c"
    mnt = mounter("--manifest", man, "--cache-dir", cache, "--cache-size", str(int(size * 1.5)))
    path = mnt.mountpoint / "model.safetensors"
    assert sha(path) == sha(src)
    wait_for(lambda: wholes(mnt, "made") == 1, what="the whole copy")
    fetched = mnt.stats()["chunks_fetched"]
    chunk_files = [p for p in (cache / "chunks").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in chunk_files) < (1 << 20)  # only the small files' chunks
    out = json.loads(run_mlfs("cache", "stats", "--json", "--cache-dir", cache).stdout)
    assert out["whole_files"] == 1 and out["chunks_in_whole_files"] >= 10
    assert out["bytes"] <= int(size * 1.5)
    drop_pages(path)
    assert sha(path) == sha(src)
    s = mnt.stats()
    assert s["passthrough_opens"] >= 1 and s["chunks_fetched"] == fetched


def test_chunks_are_read_from_a_copy_through_the_daemon_and_by_a_switch(model, mounter,
                                                                        tmp_path, store):
    """Chunks that live only in a whole copy serve a mount without passthrough (read from the
    copy, checked with blake3), and a switch to a version sharing them fetches only what
    differs, then builds the new copy from the old one."""
    man, src, want = model
    cache = tmp_path / "c"
    mnt, path = copied(mounter, man, src, cache)
    mnt.close()
    plain = mounter("--manifest", man, "--cache-dir", cache, "--no-passthrough", name="plain")
    assert load(plain.mountpoint / "model.safetensors") == want
    assert plain.stats()["chunks_fetched"] == 0
    plain.close()
    again = mounter("--manifest", man, "--cache-dir", cache, name="again")
    man2, src2, want2 = _changed(src, tmp_path, store, 4)
    res = json.loads(run_mlfs("switch", "--json", again.mountpoint, man2).stdout)
    assert res["whole_copies"] == 1
    wait_for(lambda: wholes(again, "made") == 1, what="v2's whole copy")
    s = again.stats()
    m1 = json.loads(Path(man).read_text())
    m2 = json.loads(Path(man2).read_text())
    shared = {c for f in m1["files"] for c, _ in f["chunks"]}
    delta = {c for f in m2["files"] for c, _ in f["chunks"] if c not in shared}
    assert s["chunks_fetched"] == len(delta)  # the shared ones came from v1's copy
    assert load(again.mountpoint / "model.safetensors") == want2
    assert sha(again.mountpoint / "model.safetensors") == sha(src2)


def test_a_damaged_copy_is_removed_when_a_chunk_is_read_from_it(tmp_path):
    rng = np.random.default_rng(8)
    pieces = [rng.bytes(1 << 20), rng.bytes(1 << 20)]
    cache = ChunkCache(tmp_path / "c", 64 << 20)
    entry = _cached_entry(cache, pieces)
    assert passthrough.make_whole(cache, entry) == "made"
    copy = cache.whole_file(entry.blake3)
    assert not cache.has_file(entry.chunk_ids[1]) and cache.contains(entry.chunk_ids[1])
    assert bytes(cache.get(entry.chunk_ids[1], 1 << 20)) == pieces[1]
    with open(copy, "r+b") as f:
        f.seek((1 << 20) + 5)
        f.write(b"\0")
    assert cache.get(entry.chunk_ids[1], 1 << 20) is None  # never wrong bytes
    assert cache.corrupt == 1 and cache.whole_file(entry.blake3) is None and not copy.exists()
    assert not cache.contains(entry.chunk_ids[0])  # its chunks went with it: fetched again


def test_no_passthrough_makes_no_copies(model, mounter, tmp_path):
    man, src, want = model
    cache = tmp_path / "c"
    mnt = mounter("--manifest", man, "--cache-dir", cache, "--no-passthrough")
    path = mnt.mountpoint / "model.safetensors"
    assert sha(path) == sha(src)
    assert load(path) == want
    s = mnt.stats()
    assert s["passthrough"] == "off: turned off" and s["passthrough_opens"] == 0
    assert s["whole_files"] == {} and not (cache / "files").exists()


def test_a_switch_leaves_a_passed_through_file_reading_its_version(model, mounter, tmp_path,
                                                                 store):
    """A file changed by a switch is a new inode: its old handle, passed through, reads the old
    bytes to the end; new opens read the new version."""
    from safetensors.numpy import save_file

    man, src, want = model
    mnt, path = copied(mounter, man, src, tmp_path / "c")
    d2 = tmp_path / "model2"
    d2.mkdir()
    rng = np.random.default_rng(9)
    save_file({"w": rng.standard_normal((1024, 2048), dtype=np.float32)}, str(d2 / "model.safetensors"))
    man2 = generate_into(store, d2, "pt", "v2", tmp_path)
    with open(path, "rb") as old:
        assert mnt.stats()["passthrough_opens"] == 1
        run_mlfs("switch", mnt.mountpoint, man2)
        assert sha(path) == sha(d2 / "model.safetensors")
        assert old.read() == src.read_bytes()


def _changed(src: Path, tmp_path: Path, store, n: int) -> tuple[Path, Path, dict]:
    """v2 of the model at *src*: its first *n* tensors changed (as a fine-tune changes a few),
    generated into *store*; its manifest file, model file and tensors' sha256."""
    import hashlib

    from safetensors.numpy import load_file, save_file

    t = load_file(str(src))
    for k in sorted(t)[:n]:
        t[k] = np.ascontiguousarray(t[k][::-1])  # rows reversed
    d = tmp_path / "v2"
    d.mkdir()
    save_file(t, str(d / "model.safetensors"))
    want = {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in t.items()}
    return generate_into(store, d, "pt", "v2", tmp_path), d / "model.safetensors", want


@pytest.mark.parametrize("warm", [False, True], ids=["checked", "warm"])
def test_a_switch_writes_the_copy_of_a_file_loaded_whole_before(model, mounter, tmp_path,
                                                                 store, warm):
    """After a switch, the new version of a file the old one had a whole copy of gets its own
    copy before anything reads it (docs/adr/0036): after the flip (--warm), or after the
    background fetch (a checked switch).  The load after it is the kernel's."""
    man, src, _ = model
    mnt, path = copied(mounter, man, src, tmp_path / "c")
    man2, src2, want2 = _changed(src, tmp_path, store, 4)
    before = mnt.stats()
    res = json.loads(run_mlfs("switch", "--json", *(["--warm"] if warm else []), mnt.mountpoint,
                              man2).stdout)
    assert res["whole_copies"] == 1
    wait_for(lambda: wholes(mnt, "made") == 2, what="the new version's whole copy")
    assert load(path) == want2 and sha(path) == sha(src2)
    after = mnt.stats()
    assert after["bytes_served"] == before["bytes_served"]  # not a byte through the daemon
    assert after["passthrough_opens"] >= before["passthrough_opens"] + 2
    assert after["whole_files_pending"] == 0
    if not warm:  # the fill wrote the new chunks into the copy, not into chunk files
        assert after["assembled_bytes"] - before["assembled_bytes"] == \
            after["bytes_fetched"] - before["bytes_fetched"] > 0
        assert after["salvaged_chunks"] == 0
    assert len(list((tmp_path / "c" / "files").iterdir())) == 2  # v1's copy stays, for a rollback


def test_a_switch_writes_no_copy_for_a_file_never_loaded_whole(model, mounter, tmp_path, store):
    man, src, _ = model
    mnt = mounter("--manifest", man, "--cache-dir", tmp_path / "c")
    path = mnt.mountpoint / "model.safetensors"
    with open(path, "rb") as f:
        f.read(1 << 20)  # a part only: no copy of v1, so none of v2
    man2, src2, _ = _changed(src, tmp_path, store, 4)
    res = json.loads(run_mlfs("switch", "--json", "--warm", mnt.mountpoint, man2).stdout)
    assert res["whole_copies"] == 0
    assert sha(path) == sha(src2)  # read whole now: its copy is the release's to ask for
    wait_for(lambda: wholes(mnt, "partial") >= 1 and wholes(mnt, "made") == 1,
             what="v1's copy refused, v2's made")
    assert len(list((tmp_path / "c" / "files").iterdir())) == 1


# -- in-process ----------------------------------------------------------------------------------
def test_routes_keep_an_inode_on_one_way():
    r = passthrough.Routes()
    r.open(5, None)
    r.open(5, None)
    assert r.through_daemon(5) and r.backing(5) is None
    with pytest.raises(ValueError):
        r.open(5, 7)
    assert r.close(5, False) is None and r.through_daemon(5)
    assert r.close(5, False) is None and not r.through_daemon(5)
    r.open(5, 7)
    r.open(5, 7)
    assert r.backing(5) == 7 and not r.through_daemon(5)
    with pytest.raises(ValueError):
        r.open(5, None)
    with pytest.raises(ValueError):
        r.open(5, 8)  # one backing file per inode
    assert r.close(5, True) is None
    assert r.close(5, True) == 7  # the last one: its backing id is closed
    assert r.backing(5) is None
    r.open(5, None)  # either way again
    assert r.through_daemon(5)


def _cached_entry(cache: ChunkCache, pieces: list[bytes], digest: str | None = None) -> FileEntry:
    import blake3

    ids = []
    for p in pieces:
        cid = blake3.blake3(p).hexdigest()
        assert cache.put(cid, p)
        ids.append(cid)
    whole = b"".join(pieces)
    return FileEntry("m.bin", len(whole), 0o644, digest or blake3.blake3(whole).hexdigest(), ids,
                     [len(p) for p in pieces])


def test_make_whole_checks_what_it_copies(tmp_path):
    rng = np.random.default_rng(3)
    pieces = [rng.bytes(3 << 20), rng.bytes(1 << 20), rng.bytes(200_000)]
    cache = ChunkCache(tmp_path / "c", 64 << 20)
    entry = _cached_entry(cache, pieces)
    # A mount that is ending abandons a copy past its deadline, and leaves nothing behind.
    assert passthrough.make_whole(cache, entry, deadline=time.monotonic() - 1) == "abandoned"
    assert cache.whole_file(entry.blake3) is None
    assert not list((tmp_path / "c" / "tmp").iterdir())
    assert passthrough.make_whole(cache, entry) == "made"
    copy = cache.whole_file(entry.blake3)
    assert copy is not None and copy.read_bytes() == b"".join(pieces)
    assert passthrough.make_whole(cache, entry) == "exists"
    assert cache.stats()["bytes"] >= entry.size  # counted against the cache's size
    # A manifest whose whole-file blake3 is not its chunks' bytes: no copy.
    wrong = _cached_entry(cache, pieces[::-1], digest="0" * 64)
    assert passthrough.make_whole(cache, wrong) == "damaged"
    assert cache.whole_file("0" * 64) is None and not list((tmp_path / "c" / "tmp").iterdir())
    # A chunk missing, or damaged: no copy.  (Chunks of the copy above are read from it.)
    e3 = _cached_entry(cache, [rng.bytes(200_000), pieces[1]])
    cache.path(e3.chunk_ids[0]).unlink()
    assert passthrough.make_whole(cache, e3) == "partial"
    e4 = _cached_entry(cache, [pieces[1], rng.bytes(300_000)])
    damaged = bytearray(cache.path(e4.chunk_ids[1]).read_bytes())
    damaged[7] ^= 1
    cache.path(e4.chunk_ids[1]).write_bytes(bytes(damaged))
    assert passthrough.make_whole(cache, e4) == "partial"
    assert cache.corrupt == 1 and not cache.contains(e4.chunk_ids[1])


def test_a_copy_replaces_its_chunks_and_is_evicted_with_them(tmp_path):
    rng = np.random.default_rng(4)
    cache = ChunkCache(tmp_path / "c", 11 << 20)
    old = _cached_entry(cache, [rng.bytes(3 << 20)])
    entry = _cached_entry(cache, [rng.bytes(2 << 20), rng.bytes(2 << 20)])
    assert passthrough.make_whole(cache, entry) == "made"  # in the place of its chunks
    assert cache.contains(old.chunk_ids[0]) and all(map(cache.contains, entry.chunk_ids))
    assert not any(map(cache.has_file, entry.chunk_ids))
    assert cache.stats()["bytes"] <= 11 << 20
    assert cache.size_of(entry.chunk_ids[0]) == 2 << 20
    big = _cached_entry(cache, [rng.bytes(7 << 20)])  # evicts the old chunk, then the copy
    assert not cache.contains(old.chunk_ids[0])
    assert cache.whole_file(entry.blake3) is None
    assert not any(map(cache.contains, entry.chunk_ids))  # with the copy
    assert cache.stats()["chunks_in_whole_files"] == 0
    assert cache.contains(big.chunk_ids[0])


def test_whole_copies_are_not_used_where_others_can_write_the_cache(tmp_path):
    root = tmp_path / "c"
    cache = ChunkCache(root, 64 << 20)
    entry = _cached_entry(cache, [np.random.default_rng(6).bytes(1 << 20)])
    assert passthrough.make_whole(cache, entry) == "made"
    os.chmod(root / "files", 0o777)
    assert cache.whole_file(entry.blake3) is None
    os.chmod(root, 0o777)
    assert passthrough.make_whole(ChunkCache(root, 64 << 20), entry) == "untrusted"


def test_prune_removes_copies_the_index_does_not_hold(tmp_path):
    cache = ChunkCache(tmp_path / "c", 64 << 20)
    entry = _cached_entry(cache, [np.random.default_rng(7).bytes(1 << 20)])
    assert passthrough.make_whole(cache, entry) == "made"
    planted = tmp_path / "c" / "files" / ("1" * 64)
    planted.write_bytes(b"not admitted")
    assert cache.whole_file("1" * 64) is None  # never admitted: not used
    assert cache.prune()["whole_strays_removed"] == 1
    assert not planted.exists() and cache.whole_file(entry.blake3) is not None


# -- whole copies written as their files stream in (docs/adr/0039) -------------------------------
def test_a_load_streamed_from_the_store_writes_the_copy_as_it_arrives(model, mounter, tmp_path):
    """A load recognised and streamed writes the file's chunks into its whole copy as they
    arrive, not into chunk files that the copy reads back after the load: once the copy is
    admitted, the cache holds no chunk file of the model's, and nothing was salvaged."""
    man, src, want = model
    cache = tmp_path / "c"
    mnt = mounter("--manifest", man, "--cache-dir", cache)
    path = mnt.mountpoint / "model.safetensors"
    assert load(path) == want
    wait_for(lambda: wholes(mnt, "made") == 1, what="the whole copy")
    s = mnt.stats()
    print({k: s[k] for k in ("wholes_assembled", "assembled_bytes", "assembled_reads",
                             "salvaged_chunks", "bytes_fetched", "streamed_bytes")})
    assert s["wholes_assembled"] == 1 and s["salvaged_chunks"] == 0
    assert s["assembled_bytes"] >= src.stat().st_size // 2  # all but what came before the stream
    assert sha(next((cache / "files").iterdir())) == sha(src)
    assert not list((cache / "tmp").iterdir())
    big = [p for p in (cache / "chunks").rglob("*") if p.is_file() and p.stat().st_size > 1 << 20]
    assert not big
    drop_pages(path)
    assert load(path) == want and mnt.stats()["passthrough_opens"] >= 1


HALF_LOADER = """
import sys
from safetensors import safe_open
with safe_open(sys.argv[1], "np") as f:
    keys = list(f.keys())
    for k in keys[:len(keys) * 6 // 10]:
        f.get_tensor(k)
"""


def _unread_chunks(man: Path, src: Path, read: set[str]) -> dict[str, int]:
    """The chunks of *src* (``{id: size}``, from manifest *man*) at least 1 MiB away from the
    header and every tensor in *read* (the kernel's read-ahead reaches past a tensor)."""
    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    wanted = [(8 + n + t["data_offsets"][0], 8 + n + t["data_offsets"][1])
              for k, t in header.items() if k in read] + [(0, 8 + n)]
    entry = next(f for f in json.loads(man.read_text())["files"]
                 if f["path"] == "model.safetensors")
    out, pos = {}, 0
    for cid, size in entry["chunks"]:
        if not any(a - (1 << 20) < pos + size and pos < b + (1 << 20) for a, b in wanted):
            out[cid] = size
        pos += size
    return out


def _halfway(model, mounter, store, cache: Path, name: str = "mnt"):
    """A mount of *model* whose store lacks the chunks a load of 60% of the tensors does not
    need, after that load (HALF_LOADER) through it: the mount, and the ids left out."""
    man, src, want = model
    keys = sorted(want)
    unread = _unread_chunks(man, src, set(keys[:len(keys) * 6 // 10]))
    assert unread
    for cid in unread:
        store.delete_chunk(cid)
    mnt = mounter("--manifest", man, "--cache-dir", cache, name=name)
    p = subprocess.run([sys.executable, "-c", HALF_LOADER, str(mnt.mountpoint / "model.safetensors")],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    return mnt, unread


def test_a_load_that_stops_halfway_keeps_what_it_brought_as_chunk_files(model, mounter,
                                                                        tmp_path, store):
    """A load recognised, streamed, then stopped by its process before the stream could bring
    the rest (the store lacks it, here): the copy begun for it cannot be finished; the chunks
    written into it become chunk files, and a later load fetches only what it lacks."""
    man, src, want = model
    cache = tmp_path / "c"
    mnt, unread = _halfway(model, mounter, store, cache)
    path = mnt.mountpoint / "model.safetensors"
    wait_for(lambda: wholes(mnt, "partial") >= 1 and mnt.stats()["salvaged_chunks"] > 0,
             what="the copy given up and its chunks kept")
    s = mnt.stats()
    assert s["wholes_assembled"] == 1 and "made" not in s["whole_files"]
    assert not list((cache / "tmp").iterdir()) and not list((cache / "files").glob("*"))
    fetched = s["bytes_fetched"]
    entry = next(f for f in json.loads(man.read_text())["files"]
                 if f["path"] == "model.safetensors")
    held = ChunkCache(cache, 1 << 40)  # what the cache holds, as the mount's index says
    lacking = {cid: n for cid, n in entry["chunks"] if not held.contains(cid)}
    assert set(unread) <= set(lacking) and sum(lacking.values()) < src.stat().st_size // 2
    generate_into(store, src.parent, "pt", "v1", tmp_path)  # the store whole again
    drop_pages(path)
    assert load(path) == want
    wait_for(lambda: wholes(mnt, "made") == 1, what="the whole copy")
    assert mnt.stats()["bytes_fetched"] - fetched == sum(lacking.values())  # nothing again
    assert sha(next((cache / "files").iterdir())) == sha(src)


def test_a_file_kept_open_gets_its_copy_and_an_unmount_keeps_it(model, mounter, tmp_path):
    """A file streamed whole and kept open (a server keeps its model mapped) gets its copy once
    the stream is done, not at its close: another mount of the cache sees its chunks.  An
    unmount at once, the file still open, finishes the copy (or keeps the chunks written as
    chunk files): the next mount fetches nothing again."""
    man, src, want = model
    cache = tmp_path / "c"
    first = mounter("--manifest", man, "--cache-dir", cache, name="first")
    held = open(first.mountpoint / "model.safetensors", "rb")
    try:
        assert held.read() == src.read_bytes()  # in file order: a load, streamed
        s = first.stats()
        assert s["wholes_assembled"] == 1 and s["assembled_bytes"] > 0
        wait_for(lambda: wholes(first, "made") == 1, what="the copy, the file still open")
        assert sha(next((cache / "files").iterdir())) == sha(src)
        other = mounter("--manifest", man, "--cache-dir", cache, "--no-passthrough",
                        name="other")
        assert load(other.mountpoint / "model.safetensors") == want
        assert other.stats()["chunks_fetched"] == 0
        other.close()
        first.proc.send_signal(signal.SIGTERM)
        first.proc.wait(60)
    finally:
        try:
            held.close()
        except OSError:  # ENOTCONN: the mount it was opened on is gone
            pass
    assert first.proc.returncode == 0
    assert not list((cache / "tmp").iterdir())
    first.close()
    second = mounter("--manifest", man, "--cache-dir", cache, "--no-passthrough", name="second")
    assert load(second.mountpoint / "model.safetensors") == want
    assert second.stats()["chunks_fetched"] == 0


def test_a_second_mount_reads_what_the_first_is_still_writing(model, mounter, tmp_path, store):
    """Two mounts of one cache, the second loading while the first's copy of the file is still
    being written (here the first's daemon is stopped with SIGSTOP before it could finish or give
    up the copy: its store lacked the rest): the second reads every chunk the first wrote from
    that copy, checked with blake3, and fetches only the others (docs/adr/0040)."""
    import sqlite3

    man, src, want = model
    cache = tmp_path / "c"
    first, unread = _halfway(model, mounter, store, cache, name="first")
    wait_for(lambda: first.stats()["cache_writes_pending"] == 0, what="the first's writes")
    first.proc.send_signal(signal.SIGSTOP)
    try:
        with sqlite3.connect(cache / "index.db") as db:
            written = {cid for (cid,) in db.execute("SELECT id FROM assembling")}
            files = {cid for (cid,) in db.execute("SELECT id FROM chunks")}  # came before the stream
        entry = next(f for f in json.loads(man.read_text())["files"]
                     if f["path"] == "model.safetensors")
        sizes = dict(entry["chunks"])
        assert written and not written & set(unread)
        generate_into(store, src.parent, "pt", "v1", tmp_path)  # the store whole again
        second = mounter("--manifest", man, "--cache-dir", cache, name="second")
        assert load(second.mountpoint / "model.safetensors") == want
        s = second.stats()
        assert s["peer_assembled_reads"] >= len(written)
        assert s["bytes_fetched"] == sum(n for cid, n in sizes.items()
                                         if cid not in written and cid not in files)
    finally:
        first.proc.send_signal(signal.SIGCONT)
    first.close()
    assert first.proc.returncode == 0


def _entry_of(pieces: list[bytes], digest: str | None = None) -> FileEntry:
    """A file of *pieces*, none of them cached."""
    import blake3

    whole = b"".join(pieces)
    return FileEntry("m.bin", len(whole), 0o644, digest or blake3.blake3(whole).hexdigest(),
                     [blake3.blake3(p).hexdigest() for p in pieces], [len(p) for p in pieces])


def _begin(cache: ChunkCache, entry: FileEntry, direct: bool = True):
    return cache.begin_assembly(entry.blake3, entry.size,
                                list(zip(entry.chunk_ids, entry.offsets, entry.chunk_sizes)),
                                direct)


@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "page cache"])
def test_a_copy_written_as_chunks_arrive_serves_them_and_is_admitted(tmp_path, direct):
    """Chunks offered to a copy being written go into it, at every offset the file has them,
    and into no chunk file; reads (whole, and a few blocks) find them there; make_whole writes
    the chunks it lacks from the cache, checks the whole file and admits it where it is.  A
    stream's copy is written past the page cache (checked by reading it back), a switch's
    through it (checked as the rest is written)."""
    rng = np.random.default_rng(8)
    a, b, c = rng.bytes(3 << 20), rng.bytes(1 << 20), rng.bytes(300_000)
    pieces = [a, b, a, c]  # the same chunk twice in one file
    cache = ChunkCache(tmp_path / "c", 64 << 20)
    entry = _entry_of(pieces)
    asm = _begin(cache, entry, direct)
    assert asm is not None and _begin(cache, entry) is asm
    assert (asm.direct_fd is not None) == (direct and cache.direct)
    ida, idb, _, idc = entry.chunk_ids
    assert cache.offer(ida, a) and cache.offer(idb, b)
    assert not cache.offer("f" * 64, b"not wanted")  # no copy wants it: a chunk file's
    assert not cache.has_file(ida) and cache.contains(ida) and not cache.contains(idc)
    assert bytes(cache.get(ida, len(a))) == a
    assert bytes(cache.get_part(ida, len(a), 40_000, 50_000)) == a[40_000:50_000]
    assert cache.put(idc, c)  # came another way: a chunk file, copied from the cache
    assert passthrough.make_whole(cache, entry) == "made"
    copy = cache.whole_file(entry.blake3)
    assert copy is not None and copy.read_bytes() == b"".join(pieces)
    assert cache.assembly(entry.blake3) is None and not list((tmp_path / "c" / "tmp").iterdir())
    assert not cache.has_file(idc)  # in the copy's place, as with any copy
    assert bytes(cache.get(ida, len(a))) == a  # from the admitted copy now
    assert _begin(cache, entry) is None  # it has its copy


def test_a_copy_that_cannot_be_finished_leaves_its_chunks_as_chunk_files(tmp_path):
    """A load that stopped halfway, a manifest whose file blake3 is not its chunks', a mount
    ending: the chunks written into the copy become chunk files (each checked with blake3 as it
    is read back: a byte damaged on the disk loses that chunk only), and the copy goes."""
    rng = np.random.default_rng(9)
    cache = ChunkCache(tmp_path / "c", 64 << 20)
    tmp = tmp_path / "c" / "tmp"

    def begun(pieces, digest=None, offered=None, direct=True):
        entry = _entry_of(pieces, digest)
        asm = _begin(cache, entry, direct)
        for cid, p in list(zip(entry.chunk_ids, pieces))[:offered]:
            assert cache.offer(cid, p)
        return entry, asm

    pieces = [rng.bytes(2 << 20), rng.bytes(2 << 20), rng.bytes(1 << 20)]
    entry, _ = begun(pieces, offered=2)
    assert passthrough.make_whole(cache, entry) == "partial"  # the third never came
    assert all(map(cache.has_file, entry.chunk_ids[:2])) and cache.salvaged_chunks == 2
    assert bytes(cache.get(entry.chunk_ids[1], 2 << 20)) == pieces[1]
    assert cache.assembly(entry.blake3) is None and not list(tmp.iterdir())

    for direct in (True, False):
        pieces = [rng.bytes(1 << 20), rng.bytes(1 << 20)]
        entry, _ = begun(pieces, digest="0" * 64, direct=direct)
        assert passthrough.make_whole(cache, entry) == "damaged"
        assert cache.whole_file("0" * 64) is None and all(map(cache.has_file, entry.chunk_ids))
        assert not list(tmp.iterdir())

    pieces = [rng.bytes(1 << 20), rng.bytes(1 << 20)]
    entry, asm = begun(pieces)
    os.pwrite(asm.fd, b"\xff", (1 << 20) + 5)  # the disk, in the second chunk
    cache.end_assemblies()  # as at an unmount, with the file still open
    assert cache.has_file(entry.chunk_ids[0]) and not cache.contains(entry.chunk_ids[1])
    assert cache.whole_file(entry.blake3) is None and not list(tmp.iterdir())
    assert cache.salvaged_chunks == 2 + 2 + 2 + 1


def test_another_mount_reads_chunks_from_a_copy_still_being_written(tmp_path):
    """Two mounts of one cache (two ChunkCache objects on one directory): a chunk the first
    has written into a copy it is still writing is a hit for the second, read from that copy
    and checked with blake3 (docs/adr/0040); a byte damaged there is not handed on; once the
    copy is admitted the second finds the chunk in it, and once a copy is given up its rows go
    and the chunks are chunk files."""
    rng = np.random.default_rng(11)
    pieces = [rng.bytes(2 << 20), rng.bytes(1 << 20), rng.bytes(3 << 20)]
    first = ChunkCache(tmp_path / "c", 64 << 20)
    second = ChunkCache(tmp_path / "c", 64 << 20)
    entry = _entry_of(pieces)
    ida, idb, idc = entry.chunk_ids
    asm = _begin(first, entry)
    assert first.offer(ida, pieces[0]) and first.offer(idb, pieces[1])
    assert not second.has_file(ida) and second.contains(ida) and not second.contains(idc)
    assert bytes(second.get(ida, len(pieces[0]))) == pieces[0]
    assert second.get(idc, len(pieces[2])) is None and second.peer_reads == 1
    assert first.peer_reads == 0 and bytes(first.get(idb, len(pieces[1]))) == pieces[1]

    os.pwrite(asm.fd, b"\xff", (2 << 20) + 7)  # the disk, inside the second chunk
    assert second.get(idb, len(pieces[1])) is None  # not handed on, and no longer indexed
    assert second.corrupt == 1 and not second.contains(idb)
    os.pwrite(asm.fd, pieces[1][7:8], (2 << 20) + 7)

    assert first.offer(idc, pieces[2])
    assert passthrough.make_whole(first, entry) == "made"
    assert bytes(second.get(idc, len(pieces[2]))) == pieces[2]  # from the admitted copy now
    assert second.located_reads == 1 and second.peer_reads == 1
    assert not first._db().execute("SELECT * FROM assembling").fetchall()

    other = [rng.bytes(1 << 20), rng.bytes(1 << 20)]
    entry2 = _entry_of(other)
    asm2 = _begin(second, entry2)
    assert second.offer(entry2.chunk_ids[0], other[0])
    assert first.contains(entry2.chunk_ids[0])
    asm2.tmp.unlink()  # gone under the index (a crash, then `mlfs cache prune` of tmp/)
    assert first.get(entry2.chunk_ids[0], 1 << 20) is None
    assert not first.contains(entry2.chunk_ids[0])
    second.end_assemblies()
    assert not second._db().execute("SELECT * FROM assembling").fetchall()


def test_a_given_up_copy_leaves_no_rows_for_other_mounts(tmp_path):
    """A copy given up (a mount ending) takes its rows out of the index before its file goes;
    its chunks are then found as chunk files by the other mount."""
    rng = np.random.default_rng(12)
    pieces = [rng.bytes(1 << 20), rng.bytes(1 << 20)]
    first = ChunkCache(tmp_path / "c", 64 << 20)
    second = ChunkCache(tmp_path / "c", 64 << 20)
    entry = _entry_of(pieces)
    _begin(first, entry)
    assert first.offer(entry.chunk_ids[0], pieces[0])
    assert second._peer_locations(entry.chunk_ids[0])
    first.end_assemblies()
    assert not second._peer_locations(entry.chunk_ids[0])
    assert second.has_file(entry.chunk_ids[0])
    assert bytes(second.get(entry.chunk_ids[0], 1 << 20)) == pieces[0]
    assert second.peer_reads == 0


def test_a_miss_another_mount_is_fetching_waits_for_that_fetch(tmp_path):
    """Two mounts of one cache missing the same chunk: the second to claim it waits for the
    first's fetch and reads the chunk once admitted (docs/adr/0040); if the first fails, the
    second fetches; one that waits too long fetches without a claim."""
    import threading

    rng = np.random.default_rng(13)
    data = rng.bytes(1 << 20)
    cid = __import__("blake3").blake3(data).hexdigest()
    first = ChunkCache(tmp_path / "c", 64 << 20)
    second = ChunkCache(tmp_path / "c", 64 << 20)

    claim, got = first.claim(cid, len(data), wait=5)
    assert claim is not None and got is None
    out = {}
    t = threading.Thread(target=lambda: out.update(r=second.claim(cid, len(data), wait=20)))
    t.start()
    time.sleep(0.3)
    assert t.is_alive()  # waiting for the first's fetch
    assert first.put(cid, data)
    first.release(cid, claim)
    t.join(10)
    assert out["r"][0] is None and bytes(out["r"][1]) == data and second.peer_waits == 1

    data2 = rng.bytes(1 << 20)
    cid2 = __import__("blake3").blake3(data2).hexdigest()
    claim, _ = first.claim(cid2, len(data2), wait=5)
    t = threading.Thread(target=lambda: out.update(r=second.claim(cid2, len(data2), wait=20)))
    t.start()
    time.sleep(0.2)
    first.release(cid2, claim)  # its fetch failed: nothing admitted
    t.join(10)
    theirs, got = out["r"]
    assert theirs is not None and got is None  # the second fetches it now
    second.release(cid2, theirs)

    claim, _ = first.claim(cid2, len(data2), wait=5)
    assert second.claim(cid2, len(data2), wait=0.2) == (None, None)
    assert second.claims_given_up == 1
    first.release(cid2, claim)
    assert not list((tmp_path / "c" / "fetching").iterdir())


def test_two_mounts_loading_at_once_fetch_each_chunk_once(model, mounter, tmp_path):
    """Two mounts of one cache, the same model loaded through both at the same moment: between
    them every chunk crosses the link once (docs/adr/0040): a miss the other mount is fetching
    waits for it, a chunk the other has written into its copy is read from there."""
    man, src, want = model
    cache = tmp_path / "c"
    a = mounter("--manifest", man, "--cache-dir", cache, name="a")
    b = mounter("--manifest", man, "--cache-dir", cache, name="b")
    procs = [subprocess.Popen([sys.executable, "-c", LOADER, str(m.mountpoint / "model.safetensors")],
                              stdout=subprocess.PIPE, text=True) for m in (a, b)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert [json.loads(o) for o in outs] == [want, want]
    entry = next(f for f in json.loads(man.read_text())["files"] if f["path"] == "model.safetensors")
    unique = sum(dict(entry["chunks"]).values())
    sa, sb = a.stats(), b.stats()
    print({k: (sa[k], sb[k]) for k in ("bytes_fetched", "peer_assembled_reads", "peer_fetch_waits",
                                       "peer_fetch_waits_given_up")})
    assert sa["bytes_fetched"] + sb["bytes_fetched"] == unique
    assert sa["peer_fetch_waits_given_up"] == sb["peer_fetch_waits_given_up"] == 0


def test_prune_removes_claims_a_crash_left_and_keeps_those_held(tmp_path):
    """`mlfs cache prune`: a lock file in fetching/ an hour old and free is a crash's leftover
    and goes; one still held (a fetch under way, however long) stays, as do rows of copies being
    written whose files still exist."""
    cache = ChunkCache(tmp_path / "c", 64 << 20)
    old = time.time() - 7200
    left, held = tmp_path / "c" / "fetching" / ("a" * 64), tmp_path / "c" / "fetching" / ("b" * 64)
    left.touch()
    os.utime(left, (old, old))
    claim, _ = cache.claim("b" * 64, 10, wait=1)
    os.utime(held, (old, old))
    cache.prune()
    assert not left.exists() and held.exists()
    cache.release("b" * 64, claim)
    assert not held.exists()
