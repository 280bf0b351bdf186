"""generate → store → manifest → export, byte-exact, on the local store and on S3 over HTTP."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from conftest import generate_into, run_mlfs, same_tree
from mlfs import manifest as mf
from mlfs.config import PIECE_SIZE
from mlfs.errors import StoreError
from mlfs.export import export
from mlfs.generate import generate
from mlfs.stores import open_store


@pytest.fixture
def edge_model(tmp_path) -> Path:
    """Every dtype safetensors supports, 0-d and empty tensors, metadata, shards, odd files."""
    import torch
    from safetensors.torch import save_file

    d = tmp_path / "edge"
    (d / "nested" / "deeper").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f64": torch.randn(3, 5, generator=g, dtype=torch.float64),
        "f32": torch.randn(300, 700, generator=g),  # 840 KB: a "large" tensor
        "f16": torch.randn(17, generator=g).half(),
        "bf16": torch.randn(9, 9, generator=g).bfloat16(),
        "f8e4m3": torch.randn(33, generator=g).to(torch.float8_e4m3fn),
        "f8e5m2": torch.randn(7, generator=g).to(torch.float8_e5m2),
        "i64": torch.arange(10, dtype=torch.int64), "i32": torch.arange(5, dtype=torch.int32),
        "i16": torch.arange(6, dtype=torch.int16), "i8": torch.arange(-3, 3, dtype=torch.int8),
        "u8": torch.arange(250, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
        "big": torch.randn(3000, 1000, generator=g),  # 12 MB: cut into pieces
    }
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt", "note": "edge"})
    # A sharded checkpoint with its index.
    s1 = {"a.weight": torch.randn(64, 64, generator=g)}
    s2 = {"b.weight": torch.randn(128, 64, generator=g), "b.bias": torch.zeros(128)}
    save_file(s1, str(d / "model-00001-of-00002.safetensors"))
    save_file(s2, str(d / "model-00002-of-00002.safetensors"))
    index = {"metadata": {"total_size": 0}, "weight_map": {
        "a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors",
        "b.bias": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    # A hand-written file with extra header padding, as other writers produce.
    body = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode() + b"        "
    (d / "nested" / "padded.safetensors").write_bytes(struct.pack("<Q", len(body)) + body + b"\x01" * 8)
    (d / "empty.txt").write_bytes(b"")
    (d / "nested" / "deeper" / "tokenizer.model").write_bytes(os.urandom(9 * 1024 * 1024 + 7))
    (d / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(d / "run.sh", 0o755)
    return d


def test_round_trip_edge_cases(store, edge_model, tmp_path):
    res = generate(edge_model, store, "edge", "v1")
    assert res.warnings == []
    m = mf.loads(store.get_manifest_bytes("edge", "v1"))
    by_path = {f.path: f for f in m.files}
    assert set(by_path["model.safetensors"].tensors) >= {"bf16", "f8e4m3", "scalar", "empty", "big"}
    assert len(by_path["model.safetensors"].chunk_ids) > 3  # header, pieces, glued small tensors
    assert by_path["empty.txt"].chunk_ids == []
    assert by_path["run.sh"].mode == 0o755
    export(m, store, tmp_path / "out")
    same_tree(edge_model, tmp_path / "out")
    import torch
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = load_file(str(edge_model / "model.safetensors"))
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert got[k].reshape(-1).view(torch.uint8).tolist() == \
            want[k].reshape(-1).view(torch.uint8).tolist(), k


def test_round_trip_real_minilm_via_cli(store_url, minilm_dir, tmp_path):
    p = run_mlfs("generate", minilm_dir, "--store", store_url, "--id", "minilm", "--version", "v1",
                 "-o", tmp_path / "m.json", "-m", "tags=nlp,embedding", "-m", "team=search")
    assert "minilm@v1: 13 files" in p.stderr and "uploaded" in p.stderr
    m = mf.loads((tmp_path / "m.json").read_bytes())
    assert m.metadata["library"] == "sentence-transformers"
    assert m.metadata["tags"] == ["nlp", "embedding"] and m.metadata["extra"] == {"team": "search"}
    assert "config.json" in m.prefetch and "model.safetensors" not in m.prefetch
    # export by store reference, not by file
    run_mlfs("export", "minilm@v1", tmp_path / "out", "--store", store_url)
    same_tree(minilm_dir, tmp_path / "out")
    # ... and by --id and --version, DEST_DIR the only argument (it was taken for the manifest)
    run_mlfs("export", "--store", store_url, "--id", "minilm", "--version", "v1", tmp_path / "by-id")
    same_tree(minilm_dir, tmp_path / "by-id")
    p = run_mlfs("export", "minilm@v1", tmp_path / "a", tmp_path / "b", "--store", store_url,
                 check=False)
    assert p.returncode == 2 and "at most two arguments" in p.stderr
    info = json.loads(run_mlfs("inspect", "--json", tmp_path / "m.json").stdout)
    st = next(f for f in info["files"] if f["path"] == "model.safetensors")
    assert st["tensors"] == 104 and st["chunks"] < 104  # small tensors do not cost a request each


def test_family_dedup_and_regenerate_uploads_nothing(store, family, tmp_path):
    v1 = generate(family["v1"], store, "minilm", "v1")
    assert v1.new_bytes == sum(v1.manifest.chunk_sizes().values())  # a fresh store gets them all
    again = generate(family["v1"], store, "minilm", "v1-again")
    assert again.new_bytes == 0 and again.new_chunks == 0

    have = set(v1.manifest.chunk_sizes())
    for variant in ("v2", "head", "vocab"):
        res = generate(family[variant], store, "minilm", variant)
        new = {c: s for c, s in res.manifest.chunk_sizes().items() if c not in have}
        assert res.new_bytes == sum(new.values()), variant
        have |= set(new)
        assert res.dedup_bytes > 0.8 * res.logical_bytes, (variant, res.new_bytes)

    # The grown embedding shares every full piece of the old one (its last piece and tail end
    # where the old rows ended).
    old = next(f for f in v1.manifest.files if f.path == "model.safetensors")
    vocab = mf.loads(store.get_manifest_bytes("minilm", "vocab"))
    new = next(f for f in vocab.files if f.path == "model.safetensors")
    b, e, _ = old.tensors["embeddings.word_embeddings.weight"]
    full_pieces = [c for c, o, s in zip(old.chunk_ids, old.offsets, old.chunk_sizes)
                   if o >= b and o + s < e and s == PIECE_SIZE]
    assert full_pieces and set(full_pieces) <= set(new.chunk_ids)


def test_diff_reports_changed_tensors_and_fetch_bytes(store, family, tmp_path):
    a = generate_into(store, family["v1"], "minilm", "v1", tmp_path)
    b = generate_into(store, family["v2"], "minilm", "v2", tmp_path)
    d = json.loads(run_mlfs("diff", "--json", a, b).stdout)
    changed = d["tensors"]["model.safetensors"]["changed"]
    assert changed and all(n.startswith(("encoder.layer.4.", "encoder.layer.5.", "pooler.")) for n in changed)
    assert "encoder.layer.0.output.dense.weight" not in changed
    ma, mb = mf.loads(a.read_bytes()), mf.loads(b.read_bytes())
    need = {c: s for c, s in mb.chunk_sizes().items() if c not in ma.chunk_sizes()}
    assert d["fetch_bytes"] == sum(need.values()) and 0 < d["fetch_bytes"] < 0.25 * d["logical_bytes"]
    assert d["files"]["changed"] == ["model.safetensors"]


def test_lying_safetensors_is_stored_generically(store, tmp_path):
    d = tmp_path / "liar"
    d.mkdir()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 10 ** 9) + b"{}" + os.urandom(100))
    (d / "trunc.safetensors").write_bytes(struct.pack("<Q", 50) + b'{"a": {"data_offsets": [0, 4]')
    (d / "offsets.safetensors").write_bytes(
        struct.pack("<Q", 47) + b'{"a":{"dtype":"F32","shape":[9],"data_offsets":[0,900]}}'[:47] + b"x" * 8)
    res = generate(d, store, "liar", "v1")
    assert len(res.warnings) == 3 and all("stored as plain bytes" in w for w in res.warnings)
    export(res.manifest, store, tmp_path / "out")
    same_tree(d, tmp_path / "out")


def test_bad_input_is_one_line_and_publishes_nothing(tmp_path, minilm_dir):
    store = tmp_path / "store"
    p = run_mlfs("generate", tmp_path / "missing", "--store", store, "--id", "m", "--version", "v1",
                 check=False)
    assert p.returncode != 0 and p.stderr.count("\n") == 1 and "does not exist" in p.stderr
    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text("{}")
    os.symlink(tmp_path / "nowhere", d / "dangling.bin")
    p = run_mlfs("generate", d, "--store", store, "--id", "m", "--version", "v1", check=False)
    assert p.returncode != 0 and "cannot read dangling.bin" in p.stderr and "Traceback" not in p.stderr
    assert not list((store / "manifests").glob("**/*.json")) if (store / "manifests").exists() else True
    p = run_mlfs("generate", minilm_dir, "--store", store, "--id", "../x", "--version", "v1", check=False)
    assert p.returncode != 0 and "invalid model id" in p.stderr


def test_unreachable_store_and_missing_bucket(tmp_path, minilm_dir, moto_server):
    from conftest import free_port

    env = {**os.environ, "MLFS_RETRY_DEADLINE": "2", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    p = run_mlfs("generate", minilm_dir, "--store", "s3://bucket/x", "--id", "m", "--version", "v1",
                 check=False, env=env)
    assert p.returncode != 0 and "cannot reach" in p.stderr and "Traceback" not in p.stderr
    env["AWS_ENDPOINT_URL"] = moto_server
    p = run_mlfs("generate", minilm_dir, "--store", "s3://no-such-bucket-here/x", "--id", "m",
                 "--version", "v1", check=False, env=env)
    assert p.returncode != 0 and "does not exist" in p.stderr
    p = run_mlfs("export", "m@v1", tmp_path / "o", "--store", "s3://no-such-bucket-here/x",
                 check=False, env=env)
    assert p.returncode != 0 and "does not exist" in p.stderr


def test_store_failure_mid_generate_publishes_no_manifest(tmp_path, family):
    """A chunk write that fails leaves no manifest; the rerun uploads only what is missing."""
    store = open_store(str(tmp_path / "store"), create=True)
    calls = {"n": 0}
    real_put = store._put

    def flaky_put(key, data):
        calls["n"] += 1
        if key.startswith("chunks/") and calls["n"] == 20:
            raise PermissionError("simulated refusal")
        return real_put(key, data)

    store._put = flaky_put
    with pytest.raises(StoreError, match="simulated refusal"):
        generate(family["v1"], store, "minilm", "v1")
    assert list(store.list_manifests()) == []
    store._put = real_put
    res = generate(family["v1"], store, "minilm", "v1")
    assert 0 < res.new_chunks < res.unique_chunks
    assert [(i, v) for i, v, _ in store.list_manifests()] == [("minilm", "v1")]


def test_manifest_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "mlfs.manifest/1", "id": "m", "version": "v", "files": '
                   '[{"path": "../../etc/passwd", "size": 0, "mode": 420, "blake3": "' + "a" * 64
                   + '", "chunks": []}]}')
    for cmd in (["inspect", bad], ["export", bad, tmp_path / "o", "--store", tmp_path]):
        p = run_mlfs(*cmd, check=False)
        assert p.returncode == 1 and "'..'" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert not (tmp_path / "o").exists()
