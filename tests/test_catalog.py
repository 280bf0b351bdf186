"""Store lifecycle: ls/filter, rm, gc (also racing a generate), verify — on the local store and S3."""

from __future__ import annotations

import json
import os
import time

import pytest

from conftest import run_mlfs
from mlfs import catalog
from mlfs.export import export
from mlfs.generate import generate

from conftest import same_tree


@pytest.fixture
def populated(store, family):
    """minilm v1, v2, head (sharing most chunks) and other@fp16 (sharing nothing)."""
    meta = {"v1": {"tags": "nlp,embedding", "description": "MiniLM sentence embeddings"},
            "v2": {"tags": "nlp", "description": "top layers fine-tuned", "derived_from": "v1"},
            "head": {"tags": "nlp,classifier", "description": "with a classification head"}}
    for v, m in meta.items():
        generate(family[v], store, "minilm", v, metadata=m)
    generate(family["fp16"], store, "other", "fp16", metadata={"library": "custom", "team": "edge"})
    return store


def chunk_ids(store) -> set[str]:
    return {cid for cid, _ in store.list_chunks()}


def referenced(store) -> set[str]:
    return {c for m in catalog.load_all(store) for c in m.chunk_sizes()}


def test_ls_filters_and_totals(populated, store_url):
    out = json.loads(run_mlfs("ls", store_url, "--json").stdout)
    refs = {v["id"] + "@" + v["version"] for v in out["versions"]}
    assert refs == {"minilm@v1", "minilm@v2", "minilm@head", "other@fp16"}
    totals = out["store"]
    assert totals["models"] == 2 and totals["versions"] == 4
    assert totals["stored_bytes"] == sum(info.size for _, info in populated.list_chunks())
    assert totals["logical_bytes"] > 2 * totals["stored_bytes"] * 0.9 and totals["dedup_ratio"] > 1.8
    v2 = next(v for v in out["versions"] if v["version"] == "v2")
    ms = {m.version: m for m in catalog.load_all(populated)}
    others = set().union(*(set(m.chunk_sizes()) for k, m in ms.items() if k != "v2"))
    assert v2["unique_bytes"] == sum(s for c, s in ms["v2"].chunk_sizes().items() if c not in others) > 0

    def ls(*filters):
        args = [a for f in filters for a in ("--filter", f)]
        return sorted(v["version"] for v in json.loads(run_mlfs("ls", store_url, "--json", *args).stdout)["versions"])
    assert ls("tag=classifier") == ["head"]
    assert ls("tag=nlp") == ["head", "v1", "v2"]
    assert ls("description~FINE-TUNED") == ["v2"]
    assert ls("library=custom") == ["fp16"]
    assert ls("team=edge") == ["fp16"]
    assert ls("tag=nlp", "derived_from=v1") == ["v2"]
    assert ls("tag=nope") == []
    text = run_mlfs("ls", store_url, "minilm").stdout
    assert "minilm@v2" in text and "other@fp16" not in text and "dedup ratio" in text
    p = run_mlfs("ls", store_url, "--filter", "garbage", check=False)
    assert p.returncode != 0 and "invalid filter" in p.stderr


def test_rm_then_gc_frees_exactly_the_unreferenced_chunks(populated, store_url, family, tmp_path):
    run_mlfs("alias", "set", store_url, "minilm", "canary", "v2")
    before = chunk_ids(populated)
    p = run_mlfs("rm", store_url, "minilm@v2")
    assert "removed alias minilm/canary" in p.stderr
    assert [a for a in catalog.list_aliases(populated)] == []
    still_needed = referenced(populated)
    assert before - still_needed  # v2 had chunks of its own
    assert chunk_ids(populated) == before  # rm never deletes chunks
    dry = json.loads(run_mlfs("gc", store_url, "--grace", "0", "--dry-run", "--json").stdout)
    assert dry["deleted"] == len(before - still_needed) and chunk_ids(populated) == before
    res = json.loads(run_mlfs("gc", store_url, "--grace", "0", "--json").stdout)
    assert res["deleted"] == len(before - still_needed)
    assert chunk_ids(populated) == still_needed
    for m in catalog.load_all(populated):
        dest = tmp_path / f"{m.id}-{m.version}"
        export(m, populated, dest)
        same_tree(family[m.version] if m.id == "minilm" else family["fp16"], dest)
    p = run_mlfs("rm", store_url, "minilm@v2", check=False)
    assert p.returncode == 1 and "no manifest minilm@v2" in p.stderr


def test_gc_keeps_chunks_of_a_generate_in_progress(store, family):
    """Chunks uploaded, manifest not yet written: within the grace period they are kept."""
    generate(family["v1"], store, "minilm", "v1")
    generate(family["head"], store, "minilm", "head", publish_manifest=False)  # crashed before publishing
    pending = chunk_ids(store) - referenced(store)
    assert pending
    res = catalog.gc(store, grace=3600)
    assert res.deleted == 0 and res.kept_recent == len(pending)
    assert pending <= chunk_ids(store)
    res = catalog.gc(store, grace=0)
    assert res.deleted == len(pending) and not (pending & chunk_ids(store))


def test_generate_refreshes_chunks_it_deduplicates_against(tmp_path, family):
    """The race gc ↔ generate: an old unreferenced chunk that a new generate reuses is refreshed
    (so gc keeps it) — and if gc deletes it anyway, generate uploads it again before publishing."""
    from mlfs.stores import open_store

    store = open_store(str(tmp_path / "store"), create=True)
    generate(family["v1"], store, "minilm", "v1")
    catalog.remove(store, "minilm", "v1")
    old = time.time() - 7200
    for cid, _ in store.list_chunks():
        os.utime(store.root / "chunks" / cid[:2] / cid, (old, old))
    res = generate(family["v1"], store, "minilm", "v1-again")
    assert res.new_bytes == 0
    assert catalog.gc(store, grace=3600).deleted == 0  # refreshed: young again

    # Now gc wins the race: chunks vanish after generate saw them; generate notices and re-uploads.
    real_touch = store._touch

    def touch_then_vanish(key):
        real_touch(key)
        os.unlink(store.root / key)
    store._touch = touch_then_vanish
    generate(family["v1"], store, "minilm", "v1-third")
    store._touch = real_touch
    damage, summary = catalog.verify(store, deep=True)
    assert damage == [] and summary["manifests"] == 2


def test_verify_names_damaged_model_file_and_tensor(populated, store_url):
    ms = {m.ref: m for m in catalog.load_all(populated)}
    entry = next(f for f in ms["other@fp16"].files if f.path == "model.safetensors")
    missing, corrupt = entry.chunk_ids[4], entry.chunk_ids[8]
    populated.delete_chunk(missing)
    data = bytearray(populated.get_chunk(corrupt))
    data[10] ^= 1
    populated.put_chunk(corrupt, bytes(data))
    shallow = run_mlfs("verify", store_url, check=False)
    assert shallow.returncode == 1 and f"other@fp16: model.safetensors: chunk {missing[:16]} is missing" in shallow.stdout
    assert corrupt[:16] not in shallow.stdout  # same size: only --deep can tell
    deep = run_mlfs("verify", store_url, "--deep", "--json", check=False)
    assert deep.returncode == 1
    report = json.loads(deep.stdout)
    bad = {(d["model"], d["version"], d["path"], d["chunk"], d["problem"]) for d in report["damage"]}
    assert ("other", "fp16", "model.safetensors", missing, "is missing") in bad
    assert ("other", "fp16", "model.safetensors", corrupt, "is corrupt (blake3 mismatch)") in bad
    tensors = next(d["tensors"] for d in report["damage"] if d["chunk"] == corrupt)
    b, e, _ = next(v for k, v in entry.tensors.items() if k == tensors[0])
    off = entry.offsets[8]
    assert b < off + entry.chunk_sizes[8] and e > off
    assert {d["chunk"] for d in report["damage"]} == {missing, corrupt}


def test_listing_is_paginated_on_s3(moto_server, tmp_path):
    """More chunks than one ListObjectsV2 page (1000): all are seen, and gc collects them all."""
    from concurrent.futures import ThreadPoolExecutor

    import blake3

    from conftest import make_bucket
    from mlfs.stores import open_store

    store = open_store(f"s3://{make_bucket(moto_server)}/p", endpoint_url=moto_server)
    blobs = [os.urandom(16) for _ in range(1234)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda b: store.put_chunk(blake3.blake3(b).hexdigest(), b), blobs))
    assert len(list(store.list_chunks())) == 1234
    assert catalog.gc(store, grace=0).deleted == 1234
    assert list(store.list_chunks()) == []
