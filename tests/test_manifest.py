"""The manifest loader faces untrusted input: every lie gets a one-line ManifestError."""

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mlfs import manifest as mf
from mlfs.errors import ManifestError

H = "ab" * 32


def doc(**over):
    d = {"format": mf.FORMAT, "id": "m", "version": "v1", "created": "2026-01-01T00:00:00Z",
         "metadata": {"tags": []}, "prefetch": [],
         "files": [{"path": "a/b.bin", "size": 3, "mode": 0o644, "blake3": H, "chunks": [[H, 3]]},
                   {"path": "c", "size": 0, "mode": 0o644, "blake3": H, "chunks": []}]}
    d.update(over)
    return d


def with_file(**over):
    d = doc()
    d["files"][0].update(over)
    return d


def test_round_trip_and_digest():
    m = mf.from_json(doc())
    data = m.dumps()
    again = mf.loads(data)
    assert again.digest == m.digest and again.digest.startswith("blake3:")
    assert [f.path for f in again.files] == ["a/b.bin", "c"]
    tampered = json.loads(data)
    tampered["files"][0]["mode"] = 0o600
    with pytest.raises(ManifestError, match="digest mismatch"):
        mf.from_json(tampered)


@pytest.mark.parametrize("bad,msg", [
    (with_file(path="../etc/passwd"), "'..'"),
    (with_file(path="/etc/passwd"), "absolute"),
    (with_file(path="a//b"), "empty"),
    (with_file(path="a/./b"), "'.'"),
    (with_file(path="a\0b"), "NUL"),
    (with_file(path=""), "invalid file path"),
    (with_file(size=4), "add up"),
    (with_file(size=-1), "size"),
    (with_file(size=2 ** 63), "size"),
    (with_file(size=True), "size"),
    (with_file(mode=0o4755), "mode"),
    (with_file(chunks=[[H, 0]]), "chunk reference"),
    (with_file(chunks=[["zz", 3]]), "chunk reference"),
    (with_file(chunks=[[H, 2 ** 40]]), "chunk reference"),
    (with_file(blake3="x"), "blake3"),
    (with_file(tensors={"t": [0, 9, "0" * 16]}), "tensor"),
    (doc(format="mlfs.manifest/9"), "unsupported manifest format"),
    (doc(id="../x"), "model id"),
    (doc(version=""), "version"),
    (doc(files="nope"), "files"),
    (doc(prefetch=[1]), "prefetch"),
])
def test_rejects_untrusted_input(bad, msg):
    with pytest.raises(ManifestError, match=msg) as e:
        mf.from_json(bad)
    assert "\n" not in str(e.value)


def test_rejects_duplicates_and_file_dir_clash():
    d = doc()
    d["files"].append(copy.deepcopy(d["files"][1]))
    with pytest.raises(ManifestError, match="duplicate"):
        mf.from_json(d)
    d = doc()
    d["files"].append({"path": "a/b.bin/x", "size": 0, "mode": 0o644, "blake3": H, "chunks": []})
    with pytest.raises(ManifestError, match="both a file and a directory"):
        mf.from_json(d)


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b"null", b"\xff\xfe", b"[" * 100000])
def test_malformed_json(data):
    with pytest.raises(ManifestError):
        mf.loads(data)


def test_hundred_thousand_tensors_load():
    n = 100_000
    tensors = {f"layer.{i}.weight": [i * 16, i * 16 + 16, "0123456789abcdef"] for i in range(n)}
    chunks = [[f"{i:064x}", 16 * 1000] for i in range(n // 1000)]
    d = doc(files=[{"path": "model.safetensors", "size": 16 * n, "mode": 0o644, "blake3": H,
                    "chunks": chunks, "tensors": tensors}])
    m = mf.loads(json.dumps(d))
    assert len(m.files[0].tensors) == n and m.files[0].offsets[-1] == 16 * (n - 1000)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                    max_leaves=30))
def test_fuzz_loader_never_crashes(value):
    for candidate in (value, doc(files=value), with_file(chunks=value), with_file(path=value),
                      with_file(tensors=value)):
        try:
            mf.from_json(candidate)
        except ManifestError:
            pass


def test_absurd_counts_are_refused(monkeypatch):
    monkeypatch.setattr(mf, "MAX_FILES", 1)
    with pytest.raises(ManifestError, match="too many files"):
        mf.from_json(doc())
    monkeypatch.setattr(mf, "MAX_FILES", 10)
    monkeypatch.setattr(mf, "MAX_CHUNKS", 0)
    with pytest.raises(ManifestError, match="too many chunk references"):
        mf.from_json(doc())
