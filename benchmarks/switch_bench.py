"""Switching a live mount between two versions that share most tensors, beside a remount.

    python benchmarks/switch_bench.py

MiniLM v1 → a LoRA-merged version (query/value projections of every layer changed), in a local
store. Reports the bytes a switch fetched against `mlfs diff`, the warm and flip times reported by
the mount, the wall time of `mlfs switch` as a user sees it, and the peer: unmount + mount of the new
version (what tools without live switching make users do).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import model_family  # noqa: E402

MLFS = [sys.executable, "-m", "mlfs"]


def run(*args) -> str:
    return subprocess.run([*MLFS, *map(str, args)], check=True, capture_output=True, text=True).stdout


def read_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            p.read_bytes()


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="mlfs-switchbench-"))
    base = model_family.base_model_dir()
    a_dir = model_family.write_variant(base, work / "v1", "v1")
    b_dir = model_family.write_variant(base, work / "lora", "lora")
    store = work / "store"
    run("generate", a_dir, "--store", store, "--id", "minilm", "--version", "v1", "-o", work / "a.json")
    run("generate", b_dir, "--store", store, "--id", "minilm", "--version", "lora", "-o", work / "b.json")
    diff = json.loads(run("diff", "--json", work / "a.json", work / "b.json"))
    mnt = work / "mnt"
    mnt.mkdir()
    run("mount", "--manifest", work / "a.json", "--cache-dir", work / "cache", mnt)
    try:
        read_tree(mnt)  # the host holds v1
        rows = []
        for target, label in ((work / "b.json", "v1 -> lora (cold delta)"), (work / "a.json", "lora -> v1 (cached)"),
                              (work / "b.json", "v1 -> lora (cached)")):
            t = time.perf_counter()
            out = json.loads(run("switch", mnt, target, "--json"))
            wall = time.perf_counter() - t
            rows.append((label, out, wall))
    finally:
        run("umount", mnt)
    t = time.perf_counter()
    run("mount", "--manifest", work / "a.json", "--cache-dir", work / "cache", mnt)
    run("umount", mnt)
    run("mount", "--manifest", work / "b.json", "--cache-dir", work / "cache", mnt)
    remount = time.perf_counter() - t
    run("umount", mnt)
    print(f"mlfs diff v1 -> lora: {diff['fetch_bytes']} bytes in {diff['fetch_chunks']} chunks "
          f"({diff['fetch_bytes'] / diff['logical_bytes']:.1%} of the model)")
    print(f"{'switch':<26} {'fetched':>10} {'vs diff':>8} {'warm':>8} {'flip':>9} {'mlfs switch':>12}")
    for label, out, wall in rows:
        ratio = out["bytes_fetched"] / diff["fetch_bytes"]
        print(f"{label:<26} {out['bytes_fetched']:>10} {ratio:>7.3f}x {out['warm_seconds']:>7.3f}s "
              f"{out['flip_seconds'] * 1000:>7.1f}ms {wall:>11.3f}s")
    print(f"peer: umount + mount of the other version (cache warm): {remount:.3f}s "
          f"(mlfs switch, cached: {rows[-1][2]:.3f}s = {rows[-1][2] / remount:.2f}x)")


if __name__ == "__main__":
    main()
