"""Faults: a throttling, resetting, truncating, stalling, bit-flipping S3 (moto behind mlfs.faultproxy),
a store that goes down and comes back, kill -9 of generate and of a mount, a full cache disk, leaked
secrets, and fuzzed safetensors headers.  Never wrong bytes; nothing stored is lost."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import time

import pytest
from hypothesis import given, settings, strategies as st

from conftest import MLFS, make_bucket, run_mlfs, sha
from mlfs import catalog
from mlfs import manifest as mf
from mlfs.cache import ChunkCache
from mlfs.chunking import HeaderError, header_length, parse_safetensors_header
from mlfs.faultproxy import FaultProxy
from mlfs.generate import plan_spans
from mlfs.stores import open_store

from conftest import same_tree


def sealed_and_intact(f) -> bool:
    """A cache file holds bytes whose blake3 is its name, followed by their seal (ADR 0009)."""
    import blake3

    from mlfs.cache import SEAL, seal

    raw = f.read_bytes()
    body = raw[:-SEAL]
    return blake3.blake3(body).hexdigest() == f.name and raw[-SEAL:] == seal(f.name, body)

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYSECRETKEY"


@pytest.fixture
def s3_env(moto_server):
    bucket = make_bucket(moto_server)
    return bucket, {**os.environ, "MLFS_S3_READ_TIMEOUT": "1", "MLFS_S3_CONNECT_TIMEOUT": "1",
                    "AWS_ENDPOINT_URL": moto_server}


@pytest.fixture
def proxy(moto_server):
    p = FaultProxy(moto_server, rate=0.25, stall=2.0, seed=7).start()
    yield p
    p.stop()


def test_generate_and_mount_survive_a_quarter_of_requests_faulted(s3_env, proxy, family, mounter,
                                                                  tmp_path, moto_server):
    bucket, env = s3_env
    env = {**env, "AWS_ENDPOINT_URL": proxy.url}
    url = f"s3://{bucket}/m"
    run_mlfs("generate", family["v1"], "--store", url, "--id", "minilm", "--version", "v1",
             "-o", tmp_path / "v1.json", env=env)
    run_mlfs("generate", family["v2"], "--store", url, "--id", "minilm", "--version", "v2",
             "-o", tmp_path / "v2.json", env=env)
    assert proxy.counts["faults"] >= 0.15 * proxy.counts["requests"] and proxy.counts["faults"] > 20
    assert all(proxy.counts[k] > 0 for k in ("error", "reset", "truncate", "stall"))
    # What was stored is intact (checked without the proxy)...
    clean = open_store(url, endpoint_url=moto_server)
    damage, summary = catalog.verify(clean, deep=True)
    assert damage == [] and summary["manifests"] == 2
    # ...and reads through the faulty network are byte-exact.
    before = dict(proxy.counts)
    mnt = mounter("--manifest", tmp_path / "v2.json", "--cache-dir", tmp_path / "c", env=env)
    for p in family["v2"].rglob("*"):
        if p.is_file():
            rel = p.relative_to(family["v2"])
            assert sha(mnt.mountpoint / rel) == sha(p), rel
    s = mnt.stats()
    assert proxy.counts["faults"] > before["faults"]
    assert s["retries"] + s["corrupt_chunks"] > 0 and s["bytes_fetched"] > 0
    p = run_mlfs("export", tmp_path / "v1.json", tmp_path / "out", env=env)
    same_tree(family["v1"], tmp_path / "out")


def test_permanent_errors_are_not_retried(s3_env, proxy, family):
    bucket, env = s3_env
    proxy.forbid = True
    start = time.monotonic()
    p = run_mlfs("generate", family["v1"], "--store", f"s3://{bucket}/m", "--id", "m", "--version", "v1",
                 check=False, env={**env, "AWS_ENDPOINT_URL": proxy.url})
    assert p.returncode == 1 and "denied" in p.stderr and time.monotonic() - start < 10


def test_store_down_gives_eio_in_bounded_time_and_recovers(s3_env, moto_server, family, mounter,
                                                         tmp_path):
    bucket, env = s3_env
    url = f"s3://{bucket}/m"
    run_mlfs("generate", family["v1"], "--store", url, "--id", "minilm", "--version", "v1",
             "-o", tmp_path / "v1.json", env=env)
    with FaultProxy(moto_server) as proxy:
        env = {**env, "AWS_ENDPOINT_URL": proxy.url}
        mnt = mounter("--manifest", tmp_path / "v1.json", "--cache-dir", tmp_path / "c", "--timeout", "6",
                      env=env)
        proxy.down = True
        model = mnt.mountpoint / "model.safetensors"
        start = time.monotonic()
        with open(model, "rb") as f:
            with pytest.raises(OSError) as e:
                os.pread(f.fileno(), 4096, 50 << 20)
        took = time.monotonic() - start
        assert e.value.errno == 5 and took < 8, took  # EIO within the --timeout bound
        assert mnt.stats()["fetch_errors"] > 0  # the mount is alive
        p = run_mlfs("generate", family["v2"], "--store", url, "--id", "minilm", "--version", "v2",
                     check=False, env={**env, "MLFS_RETRY_DEADLINE": "3"})
        assert p.returncode == 1 and "cannot reach" in p.stderr
        proxy.down = False
        assert sha(model) == sha(family["v1"] / "model.safetensors")  # serves again
    assert [v for _, v, _ in open_store(url, endpoint_url=moto_server).list_manifests()] == ["v1"]


def test_kill_9_during_generate_then_rerun_uploads_only_the_rest(s3_env, moto_server, family, tmp_path):
    bucket, env = s3_env
    url = f"s3://{bucket}/m"
    store = open_store(url, endpoint_url=moto_server)
    with FaultProxy(moto_server, latency=0.05) as proxy:  # slow enough to be killed half-way
        env = {**env, "AWS_ENDPOINT_URL": proxy.url}
        proc = subprocess.Popen([*MLFS, "generate", str(family["v1"]), "--store", url, "--id", "minilm",
                                 "--version", "v1", "--threads", "2"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 60
        while len(list(store.list_chunks())) < 10 and time.monotonic() < end:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    partial = {c for c, _ in store.list_chunks()}
    assert partial and list(store.list_manifests()) == []  # no manifest naming missing chunks
    out = run_mlfs("generate", family["v1"], "--store", url, "--id", "minilm", "--version", "v1",
                   "-o", tmp_path / "v1.json", env={**env, "AWS_ENDPOINT_URL": moto_server})
    m = mf.loads((tmp_path / "v1.json").read_bytes())
    total = len(m.chunk_sizes())
    uploaded = int(out.stderr.split("uploaded ")[1].split(" new chunks")[0])
    assert uploaded == total - len(partial & set(m.chunk_sizes())) < total
    assert catalog.verify(store)[0] == []


def test_kill_9_of_one_mount_leaves_the_shared_cache_and_other_mounts_fine(store, family, mounter,
                                                                          tmp_path):
    from conftest import generate_into

    man = generate_into(store, family["v1"], "minilm", "v1", tmp_path)
    cache = tmp_path / "shared"
    a = mounter("--manifest", man, "--cache-dir", cache, name="a")
    b = mounter("--manifest", man, "--cache-dir", cache, name="b")
    model_a, model_b = a.mountpoint / "model.safetensors", b.mountpoint / "model.safetensors"
    f = open(model_a, "rb")
    f.read(30 << 20)  # a is busy fetching and caching...
    a.proc.send_signal(signal.SIGKILL)  # ...when it dies
    a.proc.wait()
    try:  # beyond what the kernel had cached, its files are gone with it
        f.read(60 << 20)
    except OSError:
        pass
    with pytest.raises(OSError):
        os.statvfs(a.mountpoint)
    # (f stays open: `mlfs umount` must clear a dead mount even while a file on it is open)
    assert sha(model_b) == sha(family["v1"] / "model.safetensors")
    run_mlfs("umount", a.mountpoint)
    try:
        f.close()
    except OSError:
        pass
    a2 = mounter("--manifest", man, "--cache-dir", cache, name="a")
    assert sha(a2.mountpoint / "model.safetensors") == sha(family["v1"] / "model.safetensors")
    report = json.loads(run_mlfs("cache", "prune", "--cache-dir", cache).stdout)
    ids = mf.loads(man.read_bytes()).chunk_sizes()
    # Each as its own file, or in a whole copy of the file read whole (docs/adr/0037).
    assert report["chunks"] <= len(ids) and all(map(ChunkCache(cache, 1 << 30).contains, ids))
    for f in (cache / "chunks").rglob("*"):
        if f.is_file():
            assert sealed_and_intact(f)  # nothing torn


def test_full_cache_disk_still_serves_correct_bytes(store, family, mounter, tmp_path):
    from conftest import generate_into, require

    man = generate_into(store, family["v1"], "minilm", "v1", tmp_path)
    cache = tmp_path / "tiny-fs"
    cache.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(cache)], capture_output=True)
    require(r.returncode == 0, f"cannot mount a tmpfs: {r.stderr!r}")
    try:
        mnt = mounter("--manifest", man, "--cache-dir", cache, "--cache-size", "1G")
        assert sha(mnt.mountpoint / "model.safetensors") == sha(family["v1"] / "model.safetensors")
        s = mnt.stats()
        assert s["cache_write_errors"] > 0 and s["fetch_errors"] == 0
        mnt.close()
        for f in (cache / "chunks").rglob("*"):
            if f.is_file():
                assert sealed_and_intact(f)
    finally:
        subprocess.run(["umount", "-l", str(cache)], capture_output=True)


def test_credentials_never_leak(s3_env, family, mounter, tmp_path, moto_server):
    bucket, env = s3_env
    env = {**env, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": "AKIDLEAKCHECK"}
    url = f"s3://{bucket}/m"
    out = run_mlfs("generate", family["v1"], "--store", url, "--id", "minilm", "--version", "v1",
                   "-o", tmp_path / "v1.json", env=env)
    mnt = mounter("--manifest", tmp_path / "v1.json", "--cache-dir", tmp_path / "c", "--debug", env=env)
    (mnt.mountpoint / "config.json").read_bytes()
    stats = run_mlfs("stats", mnt.mountpoint, "--json").stdout
    mnt.close()
    with FaultProxy(moto_server) as proxy:
        proxy.forbid = True
        err = run_mlfs("ls", url, check=False, env={**env, "AWS_ENDPOINT_URL": proxy.url}).stderr
    texts = [out.stdout, out.stderr, (tmp_path / "v1.json").read_text(), stats, mnt.log.read_text(), err]
    for text in texts:
        assert SECRET not in text and "AKIDLEAKCHECK" not in text


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 5000))
def test_fuzz_safetensors_header_parser(data, extra):
    size = len(data) + extra
    try:
        n = header_length(data[:8], size)
        start, tensors = parse_safetensors_header(data[:8 + n], size)
        assert all(start <= t.begin <= t.end <= size for t in tensors)
    except HeaderError:
        pass
    spans, _, _ = plan_spans("x.safetensors", data + b"\0" * extra, size)
    pos = 0
    for a, b in spans:
        assert a == pos and b > a
        pos = b
    assert pos == size


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.fixed_dictionaries(
    {"dtype": st.sampled_from(["F32", "BF16", "x"]), "shape": st.lists(st.integers(-2, 4), max_size=3),
     "data_offsets": st.lists(st.integers(-5, 200), min_size=0, max_size=3)}), max_size=6),
    st.integers(0, 300))
def test_fuzz_structured_headers(doc, data_len):
    body = json.dumps(doc).encode()
    blob = struct.pack("<Q", len(body)) + body + b"\0" * data_len
    spans, tensors, warning = plan_spans("m.safetensors", blob, len(blob))
    assert (tensors is None) == (warning is not None)
    assert sum(b - a for a, b in spans) == len(blob)


@pytest.mark.parametrize("path", ["../../etc/shadow", "/etc/shadow", "a/../../b", "a\u0000b", "./x", "a//b"])
def test_hostile_manifest_is_refused_before_mounting(tmp_path, path):
    doc = {"format": "mlfs.manifest/1", "id": "evil", "version": "v1",
           "files": [{"path": path, "size": 0, "mode": 420, "blake3": "0" * 64, "chunks": []}]}
    bad = tmp_path / "evil.json"
    bad.write_text(json.dumps(doc))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = run_mlfs("mount", "--manifest", bad, "--store", tmp_path, mnt, check=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "invalid file path" in p.stderr
    assert not os.path.ismount(mnt)
