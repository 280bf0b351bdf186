"""`mlfs generate` throughput on a cold 2 GiB model into a local store, beside `cp -r` of the same
directory into the same file system (the floor: read once, write once, no hashing).

    python benchmarks/generate_throughput.py [--size-gib 2] [--work DIR]

"Cold" means the page cache is dropped before each run (needs root; without it runs are warm and
the script says so).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import drop_caches, make_model  # noqa: E402


def timed(cmd: list[str]) -> float:
    cold = drop_caches()
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.sync()  # both must reach the disk's cache for a fair comparison
    dt = time.perf_counter() - t
    timed.cold = cold
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mlfs-genbench-", dir="/var/tmp"))
    model = work / "model"
    if not (model / "model.safetensors").exists():
        make_model(model, int(args.size_gib * 2**30))
    size = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
    rows = {"mlfs generate": [], "... --no-compress": [], "cp -r": []}
    for _ in range(args.runs):
        shutil.rmtree(work / "store", ignore_errors=True)
        rows["mlfs generate"].append(timed([sys.executable, "-m", "mlfs", "generate", str(model),
                                            "--store", str(work / "store"), "--id", "bench",
                                            "--version", "v1", "-o", str(work / "m.json")]))
        shutil.rmtree(work / "store", ignore_errors=True)
        rows["... --no-compress"].append(timed([
            sys.executable, "-m", "mlfs", "generate", str(model), "--store", str(work / "store"),
            "--id", "bench", "--version", "v1", "-o", str(work / "m.json"), "--no-compress"]))
        shutil.rmtree(work / "copy", ignore_errors=True)
        rows["cp -r"].append(timed(["cp", "-r", str(model), str(work / "copy")]))
    print(f"model: {size / 2**30:.2f} GiB, page cache dropped before each run: {timed.cold}; "
          f"best of {args.runs}")
    best = {k: min(v) for k, v in rows.items()}
    for name, t in best.items():
        print(f"{name:<16} {t:6.2f} s  {size / t / 1e6:7.0f} MB/s  ({best['cp -r'] / t:.2f}x cp)")
    shutil.rmtree(work / "copy", ignore_errors=True)
    shutil.rmtree(work / "store", ignore_errors=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
