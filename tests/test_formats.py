"""Tensor-aware chunking of GGUF files and PyTorch zip checkpoints (issue 15): real files written
by each format's own writer from MiniLM variants, dedup across versions, byte-exact loads through a
mount by each format's own reader, and fuzzed headers that must never be trusted blindly."""

from __future__ import annotations

import json
import struct

import blake3
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import generate_into, run_mlfs, sha
from mlfs import formats
from mlfs.chunking import HeaderError
from mlfs.generate import covers, generate, plan_spans


@pytest.fixture(scope="module")
def gguf_family(tmp_path_factory, family):
    import model_family

    out = tmp_path_factory.mktemp("gguf")
    made = {}
    for v in ("v1", "v2", "full"):
        made[v] = model_family.write_gguf(family[v], out / v / "model.gguf")
    made["meta"] = model_family.write_gguf(family["v1"], out / "meta" / "model.gguf",
                                           description="same weights, one more metadata field")
    return made


@pytest.fixture(scope="module")
def torch_family(tmp_path_factory, family):
    import model_family

    out = tmp_path_factory.mktemp("torch")
    return {v: model_family.write_torch(family[v], out / v / "pytorch_model.bin")
            for v in ("v1", "v2", "head")}


def chunk_set(path, rel):
    data = path.read_bytes()
    spans, tensors, warning = plan_spans(rel, data, len(data))
    assert warning is None and covers(spans, len(data))
    return {blake3.blake3(data[a:b]).hexdigest(): b - a for a, b in spans}, tensors


def test_gguf_tensor_table_matches_gguf_py(gguf_family):
    import gguf

    data = gguf_family["v1"].read_bytes()
    layout = formats.parse_gguf(data, len(data))
    reader = gguf.GGUFReader(str(gguf_family["v1"]))
    want = {t.name: (int(t.data_offset), int(t.data_offset) + int(t.n_bytes)) for t in reader.tensors}
    assert {n: (b, e) for n, b, e in layout.tensors} == want
    ours = formats.GGML_SIZES
    theirs = {int(k): tuple(v) for k, v in gguf.GGML_QUANT_SIZES.items()}
    assert all(theirs[k] == v for k, v in ours.items() if k in theirs)


def test_gguf_metadata_change_moves_no_tensor_chunk(gguf_family):
    a, _ = chunk_set(gguf_family["v1"], "model.gguf")
    b, _ = chunk_set(gguf_family["meta"], "model.gguf")
    new = {k: v for k, v in b.items() if k not in a}
    # Only the small packed run of key/values around the new field is new: no tensor, and not
    # the 30k-token vocabulary either.
    assert len(new) <= 2 and sum(new.values()) < 4096, new


def test_changed_tensors_cost_their_own_pieces(gguf_family, torch_family):
    for files, rel in ((gguf_family, "model.gguf"), (torch_family, "pytorch_model.bin")):
        a, ta = chunk_set(files["v1"], rel)
        b, tb = chunk_set(files["v2"], rel)
        changed = {n: e - s for n, s, e in tb if n.startswith(("encoder.layer.4.", "encoder.layer.5.",
                                                                 "pooler."))}
        assert changed, rel
        new = sum(v for k, v in b.items() if k not in a)
        # The changed tensors, plus the small unchanged ones glued to them and the zip's central
        # directory: within 10% of the changed bytes, where fixed offsets re-upload whole pieces.
        assert sum(changed.values()) <= new <= 1.1 * sum(changed.values()) + 65536, (rel, new)


def test_torch_storages_are_named_from_the_pickle_without_running_it(torch_family):
    import torch

    _, tensors = chunk_set(torch_family["head"], "pytorch_model.bin")
    names = {n for n, _, _ in tensors}
    sd = torch.load(str(torch_family["head"]), weights_only=True)
    assert names == set(sd)
    data = torch_family["head"].read_bytes()
    for name, b, e in tensors:
        assert data[b:e] == sd[name].numpy().tobytes(), name


def test_mounted_files_load_with_their_own_readers(store, gguf_family, torch_family, mounter,
                                                   tmp_path):
    import gguf
    import torch

    d = tmp_path / "model"
    d.mkdir()
    (d / "model.gguf").write_bytes(gguf_family["v2"].read_bytes())
    (d / "pytorch_model.bin").write_bytes(torch_family["v2"].read_bytes())
    man = generate_into(store, d, "formats", "v1", tmp_path)
    m = json.loads(man.read_text())
    assert all(f.get("tensors") for f in m["files"])
    mnt = mounter("--manifest", man, "--store", store.url, "--cache-dir", tmp_path / "c")
    got = gguf.GGUFReader(str(mnt.mountpoint / "model.gguf"))
    want = gguf.GGUFReader(str(d / "model.gguf"))
    assert [t.name for t in got.tensors] == [t.name for t in want.tensors]
    for t, w in zip(got.tensors, want.tensors):
        assert np.array_equal(np.asarray(t.data), np.asarray(w.data)), t.name
    for mmap in (False, True):
        a = torch.load(str(mnt.mountpoint / "pytorch_model.bin"), weights_only=True, mmap=mmap)
        b = torch.load(str(d / "pytorch_model.bin"), weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    assert sha(mnt.mountpoint / "model.gguf") == sha(d / "model.gguf")


def test_inspect_and_diff_name_gguf_tensors(tmp_path, gguf_family):
    store = tmp_path / "store"
    for v in ("v1", "v2"):
        d = tmp_path / v
        d.mkdir()
        (d / "model.gguf").write_bytes(gguf_family[v].read_bytes())
        run_mlfs("generate", d, "--store", store, "--id", "g", "--version", v, "-o", tmp_path / f"{v}.json")
    out = run_mlfs("inspect", tmp_path / "v2.json", "--tensors").stdout
    assert "encoder.layer.5.output.dense.weight" in out
    d = json.loads(run_mlfs("diff", "g@v1", "g@v2", "--store", store, "--json").stdout)
    assert "encoder.layer.5.output.dense.weight" in json.dumps(d)
    assert "embeddings.word_embeddings.weight" not in json.dumps(d.get("changed", d))


def test_a_lying_header_is_stored_as_plain_bytes(store, gguf_family, tmp_path):
    data = bytearray(gguf_family["v1"].read_bytes())
    struct.pack_into("<Q", data, 8, 10 ** 12)  # a tensor count no file holds
    d = tmp_path / "liar"
    d.mkdir()
    (d / "model.gguf").write_bytes(bytes(data))
    (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    res = generate(d, store, "liar", "v1")
    assert len(res.warnings) == 2 and all("plain bytes" in w for w in res.warnings)
    from mlfs.export import export

    export(res.manifest, store, tmp_path / "out")
    assert (tmp_path / "out" / "model.gguf").read_bytes() == bytes(data)


def _check(layout, size):
    assert covers(layout.spans, size)
    last = 0
    for _, b, e in sorted(layout.tensors, key=lambda t: t[1]):
        assert last <= b <= e <= size
        last = e


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=4096), st.integers(0, 4095), st.binary(min_size=1, max_size=8))
def test_fuzz_gguf_parser(gguf_prefix_bytes, cut, junk):
    """Random bytes, and a real GGUF header cut short or overwritten anywhere: HeaderError or a
    layout that covers the file exactly — nothing else."""
    for data in (b"GGUF" + gguf_prefix_bytes, _real_gguf()[:cut] + junk + _real_gguf()[cut + len(junk):]):
        try:
            layout = formats.parse_gguf(data, len(data))
        except HeaderError:
            continue
        _check(layout, len(data))


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, 2000), st.binary(min_size=1, max_size=16))
def test_fuzz_torch_zip_parser(at, junk):
    real = _real_torch()
    for data in (real[:at] + junk + real[at + len(junk):], real[:at]):
        try:
            layout = formats.parse_torch_zip(data, len(data))
        except HeaderError:
            continue
        _check(layout, len(data))


_CACHE: dict[str, bytes] = {}


def _real_gguf() -> bytes:
    if "gguf" not in _CACHE:
        import tempfile

        import gguf

        with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
            w = gguf.GGUFWriter(f.name, "llama")
            w.add_name("tiny")
            w.add_token_list(["a", "b", "c"])
            w.add_tensor("w", np.arange(64, dtype=np.float32).reshape(8, 8))
            w.add_tensor("b", np.arange(8, dtype=np.float16))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            _CACHE["gguf"] = open(f.name, "rb").read()
    return _CACHE["gguf"]


def _real_torch() -> bytes:
    if "torch" not in _CACHE:
        import io

        import torch

        buf = io.BytesIO()
        torch.save({"w": torch.arange(64.0).reshape(8, 8), "b": torch.zeros(8)}, buf)
        _CACHE["torch"] = buf.getvalue()
    return _CACHE["torch"]
