"""Chunks stored as compressed frames (mlfs.codec, docs/adr/0022): the codec on its own, hostile
objects, and a compressed store end to end — generate, verify, export and a real mount."""

from __future__ import annotations

import json

import blake3
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import generate_into, run_mlfs, sha
from mlfs import codec, config
from mlfs.errors import CorruptChunk
from mlfs.stores import open_store

MAX = config.MAX_CHUNK_SIZE
rng = np.random.default_rng(7)
FP32 = rng.standard_normal(1 << 20, dtype=np.float32).tobytes()  # 4 MiB, like weights
BF16 = ((rng.standard_normal(1 << 20, dtype=np.float32) * 0.02).view(np.uint32) >> 16) \
    .astype(np.uint16).tobytes()  # bf16 bit patterns of small weights
RANDOM = rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()


def cid(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


@pytest.mark.parametrize("data, typesize, most", [(FP32, 4, 0.88), (BF16, 2, 0.75)])
def test_weights_become_smaller_frames_of_their_element_size(data, typesize, most):
    frame = codec.encode(data)
    assert frame is not None and frame[:4] == codec.FRAME_MAGIC and frame[4] == typesize
    assert len(frame) <= most * len(data)
    assert codec.decode(frame, len(data)) == data
    assert codec.verified(cid(data), frame, len(data), MAX) == data
    assert codec.verified(cid(data), frame, None, MAX) == data  # mlfs serve knows no size


def test_what_does_not_pay_is_stored_as_it_is():
    assert codec.encode(RANDOM) is None
    assert codec.encode(FP32[:1000]) is None  # too small to be worth a frame
    assert codec.verified(cid(RANDOM), RANDOM, len(RANDOM), MAX) == RANDOM


@pytest.mark.parametrize("cut", [1, 2, 3, 5])
def test_a_tail_shorter_than_an_element_survives(cut):
    data = FP32[:-cut]
    for ts in codec.TYPESIZES:
        assert codec.ungroup(codec.group(data, ts), ts) == data
    frame = codec.encode(data)
    assert frame is not None and codec.decode(frame, len(data)) == data


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4099), st.integers(1, 16))
def test_c_grouping_equals_the_python_one(data, typesize):
    """mlfs/_shuffle.c is built by the installer (gcc is part of its set-up); the pure-Python
    path is the fallback and the reference."""
    assert codec._group_c is not None, "mlfs._shuffle was not built: pip install -e . with gcc"
    grouped = codec._group_py(data, typesize)
    assert codec._group_c(data, typesize) == grouped
    assert codec._ungroup_c(grouped, typesize) == codec._ungroup_py(grouped, typesize) == data
    assert codec._group_c(memoryview(data), typesize) == grouped  # any buffer


def test_a_raw_chunk_that_starts_with_the_magic_is_still_itself():
    data = codec.FRAME_MAGIC + bytes((4, 0, 0, 0)) + RANDOM
    assert codec.encode(data) is None
    assert codec.verified(cid(data), data, len(data), MAX) == data
    # ... and a compressible one is framed like any other
    data = codec.FRAME_MAGIC + FP32
    assert codec.verified(cid(data), codec.encode(data), len(data), MAX) == data


def _frame(ts: int, body: bytes) -> bytes:
    return codec.FRAME_MAGIC + bytes((ts, 0, 0, 0)) + body


def test_hostile_objects_are_refused_not_decoded():
    data = FP32
    good = codec.encode(data)
    c = zstandard.ZstdCompressor(level=1)
    bomb = c.compress(bytes(64 << 20))  # 64 MiB of zeros in a few KiB
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(codec.group(data, 4))
    for bad, why in [
        (good[:-1], "truncated"),
        (good[:8] + b"\0" * 16, "header only"),
        (_frame(3, good[8:]), "unknown typesize"),
        (good[:5] + b"\1" + good[6:], "reserved bytes set"),
        (_frame(4, bomb), "declares more than the chunk"),
        (_frame(4, c.compress(codec.group(data, 4)[:-4])), "declares less"),
        (_frame(4, unsized), "no content size"),
        (_frame(2, good[8:]), "right bytes, wrong grouping"),
        (data[:-1], "raw, one byte short"),
        (b"", "empty"),
    ]:
        assert codec.verified(cid(data), bad, len(data), MAX) is None, why
        if why.startswith("right bytes"):  # decodes, to other bytes: only the id can tell
            assert codec.decode(bad, len(data)) != data
        else:
            with pytest.raises(codec.FrameError):
                codec.decode(bad, len(data))
    # without a size, a frame may not claim more than the largest chunk
    assert codec.verified(cid(bytes(64 << 20)), _frame(1, bomb), None, 1 << 20) is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, 64))
def test_damaged_frames_never_give_wrong_bytes(flips, cut):
    """Any mix of flipped bytes and truncation: the exact chunk or None, never anything else."""
    data = FP32[:1 << 17]
    frame = bytearray(codec.encode(data))
    for pos, value in flips:
        frame[pos % len(frame)] = value
    frame = bytes(frame[:len(frame) - cut])
    assert codec.verified(cid(data), frame, len(data), MAX) in (None, data)
    assert codec.verified(cid(data), frame, None, MAX) in (None, data)


def test_store_retries_a_damaged_frame_then_names_the_chunk(tmp_path):
    store = open_store(str(tmp_path / "s"), create=True)
    c = cid(FP32)
    stored = store.put_chunk_encoded(c, FP32, compress=True)
    assert stored < len(FP32)
    assert store.get_chunk_verified(c, len(FP32)) == FP32
    assert store.received_bytes == stored
    frame = bytearray(store.get_chunk(c))
    frame[len(frame) // 2] ^= 0xFF
    store.put_chunk(c, bytes(frame))
    with pytest.raises(CorruptChunk, match=c[:16]):
        store.get_chunk_verified(c, len(FP32), attempts=2)
    assert store.corrupt_reads == 2


def _chunk_objects(store, manifest) -> dict[str, tuple[int, int]]:
    """chunk id -> (its size, the size of its object in the store)."""
    from mlfs import manifest as mf

    m = mf.loads(manifest.read_bytes())
    listed = {c: info.size for c, info in store.list_chunks()}
    return {c: (size, listed[c]) for c, size in m.chunk_sizes().items()}


def test_compressed_store_end_to_end(store_url, store, minilm_dir, mounter, tmp_path):
    """MiniLM (real fp32 weights) generated compressed into a local or S3 store: its weights are
    frames a sixth smaller, verify --deep passes, export and a real mount give exact bytes, and the
    mount's stats show fewer bytes received than fetched."""
    gen = run_mlfs("generate", minilm_dir, "--store", store_url, "--id", "minilm", "--version",
                   "v1", "-o", tmp_path / "v1.json")
    assert " stored)" in gen.stderr  # "uploaded N new chunks (X MiB, Y MiB stored)"
    objects = _chunk_objects(store, tmp_path / "v1.json")
    raw = sum(s for s, _ in objects.values())
    kept = sum(o for _, o in objects.values())
    assert kept < 0.9 * raw, (kept, raw)
    assert any(o == s for s, o in objects.values())  # small files stay as they are

    assert json.loads(run_mlfs("verify", store_url, "--deep", "--json").stdout)["damage"] == []
    run_mlfs("export", tmp_path / "v1.json", "--store", store_url, tmp_path / "copy")
    assert sha(tmp_path / "copy" / "model.safetensors") == sha(minilm_dir / "model.safetensors")

    mnt = mounter("--manifest", tmp_path / "v1.json", "--store", store_url,
                  "--cache-dir", tmp_path / "cache")
    from safetensors.numpy import load_file

    got, want = load_file(mnt.mountpoint / "model.safetensors"), load_file(
        minilm_dir / "model.safetensors")
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)
    s = json.loads(run_mlfs("stats", "--json", mnt.mountpoint).stdout)
    assert 0 < s["received_bytes"] < 0.9 * s["bytes_fetched"], s
    assert s["corrupt_chunks"] == 0


def test_no_compress_stores_every_chunk_as_it_is(store, minilm_dir, tmp_path):
    path = generate_into(store, minilm_dir, "minilm", "v1", tmp_path, compress=False)
    assert all(s == o for s, o in _chunk_objects(store, path).values())
    # a compressed generate of the same model finds every chunk there and leaves it as it is
    path2 = generate_into(store, minilm_dir, "minilm", "v2", tmp_path)
    assert all(s == o for s, o in _chunk_objects(store, path2).values())


def test_verify_deep_names_a_damaged_frame(store_url, store, minilm_dir, tmp_path):
    path = generate_into(store, minilm_dir, "minilm", "v1", tmp_path)
    framed = [c for c, (s, o) in _chunk_objects(store, path).items() if o < s]
    victim = framed[len(framed) // 2]
    body = bytearray(store.get_chunk(victim))
    body[-100] ^= 0x40
    store.put_chunk(victim, bytes(body))
    assert run_mlfs("verify", store_url, check=False).returncode == 0  # a frame: sizes cannot tell
    deep = run_mlfs("verify", store_url, "--deep", "--json", check=False)
    assert deep.returncode == 1
    damage = json.loads(deep.stdout)["damage"]
    assert [(d["chunk"], d["problem"]) for d in damage] == \
        [(victim, "is corrupt (blake3 mismatch)")]
