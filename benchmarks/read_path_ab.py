"""Interleaved A/B runs of two read-path choices, each against its alternative, in one run.

    python benchmarks/read_path_ab.py [--rounds 3] [--size-gib 1]

- cold read from s3rver: GETs through the direct path (docs/adr/0010) vs through boto3
  (``MLFS_S3_DIRECT=0``); s5cmd's download in the same rounds as the reference;
- warm read (chunks cached, page cache dropped): loads checked by their seal (docs/adr/0009) vs
  re-hashed with blake3 — what the cache does when other users could write it, so a
  group-writable ``chunks/`` directory selects it without touching the code.

This VM's speed moves by 2x within minutes, so the variants alternate within each round and the
report gives every run, the medians and their ratio.  CPU is the mount process's (and s3rver's) from
/proc, around the read only.  Needs what mount_bench.py needs (root, node + s3rver, s5cmd).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import drop_caches  # noqa: E402
from mount_bench import S5CMD, CpuMeter, MlfsMount, bench_store, log, read_all  # noqa: E402

MB = 1e6


def mount_read(mnt: Path, manifest: Path, cache: Path, server_pid: int) -> tuple[float, float, float]:
    """(seconds, mount CPU, server CPU) of one sequential read of the model through a fresh mount."""
    m = MlfsMount(mnt, manifest, cache)
    try:
        drop_caches()
        with CpuMeter(server_pid, m.proc.pid) as cpu:
            dt = read_all(mnt / "model.safetensors")
        return dt, cpu.client, cpu.server
    finally:
        m.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/mlfs-read-ab"))
    args = ap.parse_args()
    runs: dict[str, list[tuple[float, float, float]]] = {}
    with bench_store(args.work, args.size_gib) as (env, endpoint, server, src, manifest):
        size = src.stat().st_size
        mnt = args.work / "mnt-ab"
        dl = args.work / "download"
        for r in range(args.rounds):
            log(f"round {r + 1}/{args.rounds}")
            dl.unlink(missing_ok=True)
            drop_caches()
            with CpuMeter(server.pid) as cpu:
                t = time.perf_counter()
                subprocess.run([S5CMD, "--endpoint-url", endpoint, "cp", "s3://bench/raw/model.safetensors",
                                str(dl)], env=env, check=True, stdout=subprocess.DEVNULL)
                dt = time.perf_counter() - t
            runs.setdefault("cold: s5cmd download (reference)", []).append((dt, cpu.client, cpu.server))
            for label, flag in (("cold: boto3 GETs", "0"), ("cold: direct GETs", "1")):
                os.environ["MLFS_S3_DIRECT"] = flag
                cache = args.work / f"cache-cold-{flag}"
                shutil.rmtree(cache, ignore_errors=True)
                runs.setdefault(label, []).append(mount_read(mnt, manifest, cache, server.pid))
            os.environ.pop("MLFS_S3_DIRECT", None)
            warm = args.work / "cache-warm"
            if r == 0:
                mount_read(mnt, manifest, warm, server.pid)  # fill it once
            for label, mode in (("warm: loads re-hashed (blake3)", 0o775), ("warm: loads sealed", 0o755)):
                os.chmod(warm / "chunks", mode)
                runs.setdefault(label, []).append(mount_read(mnt, manifest, warm, server.pid))
    print(f"\nread-path A/B, {size / 2**30:.2f} GiB safetensors, s3rver on loopback, "
          f"{os.cpu_count()} cores, {args.rounds} rounds (variants alternate within a round)\n")
    print(f"  {'variant':<34} {'median':>9} {'runs (MB/s)':<26} {'mount CPU s':<18} {'s3rver CPU s'}")
    med = {}
    for label, rs in runs.items():
        med[label] = statistics.median(size / dt / MB for dt, _, _ in rs)
        speeds = " ".join(f"{size / dt / MB:.0f}" for dt, _, _ in rs)
        mount = " ".join(f"{c:.2f}" for _, c, _ in rs) if not label.endswith("(reference)") else "-"
        srv = " ".join(f"{s:.2f}" for _, _, s in rs)
        print(f"  {label:<34} {med[label]:6.0f} MB/s {speeds:<26} {mount:<18} {srv}")
    print()
    for new, old in (("cold: direct GETs", "cold: boto3 GETs"),
                     ("warm: loads sealed", "warm: loads re-hashed (blake3)")):
        print(f"  {new} / {old}: {med[new] / med[old]:.2f}x throughput")
    print(f"  cold: direct GETs / s5cmd: {med['cold: direct GETs'] / med['cold: s5cmd download (reference)']:.2f}x")


if __name__ == "__main__":
    main()
