"""Where the CPU of one GiB goes: the budget behind the mount's unmet throughput targets.

    python benchmarks/bounds.py [--size-gib 1]

On this machine the S3 server, the mount and the reader share two cores, so a read can be no faster
than (CPU everyone spends on it) / (cores).  This script measures each part of a read in one run and
prints that floor next to the measured wall time:

- cold: s5cmd's download; mlfs's fetch alone (its store code on 16 threads: GET + blake3, no FUSE,
  no cache); a cold read through the mount.  Server and client CPU for each.
- warm: the virtual disk reading the cache's chunk files (4 threads) and the model file; the mount
  serving from its memory buffer (the FUSE path alone); the mount reading its disk cache.
- page cache: how the kernel holds each file (large folios or 4 KiB pages, from /proc/kpageflags)
  and re-reads with 1 MiB reads.

Needs root (FUSE, dropping the page cache, /proc/kpageflags), node + s3rver, s5cmd.  The numbers
behind docs/adr/0012.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import drop_caches  # noqa: E402
from mount_bench import S5CMD, MlfsMount, bench_store, children_cpu, cpu_seconds, read_all  # noqa: E402

GiB = 1 << 30
rows: list[tuple[str, str, float, dict[str, float]]] = []


def row(group: str, name: str, wall: float, cpu: dict[str, float]) -> None:
    rows.append((group, name, wall, cpu))
    print(f"  {group} | {name}: {wall:.2f} s, CPU {cpu}", file=sys.stderr, flush=True)


def read_file(path: Path, bufsize: int = 1 << 20) -> tuple[float, float]:
    """Wall and this process's CPU for reading *path* once with *bufsize* reads."""
    c = time.process_time()
    wall = read_all(path, bufsize)
    return wall, time.process_time() - c


def drop_file_pages(path: Path) -> None:
    """Drop one file's pages from the page cache (a FUSE file's too), so that the next read goes
    through the mount again while everything else stays where it is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def folio_share(path: Path, limit: int = 256 << 20) -> float:
    """Share of the first *limit* bytes of *path* that the page cache holds in large folios
    (compound pages), after mapping and touching them; from /proc/self/pagemap and /proc/kpageflags.
    The mapping is copy-on-write only so that ctypes can take its address; nothing is written, so
    every page seen is the page cache's own."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = min(os.fstat(fd).st_size, limit) // 4096 * 4096
        m = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    pages = (ctypes.c_char * size).from_buffer(m)
    try:
        addr = ctypes.addressof(pages)
        for off in range(0, size, 4096):
            pages[off]  # fault every page in
        compound = present = 0
        with open("/proc/self/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
            for i in range(size // 4096):
                pm.seek((addr // 4096 + i) * 8)
                entry = struct.unpack("Q", pm.read(8))[0]
                if not entry >> 63:  # not present
                    continue
                kf.seek((entry & ((1 << 55) - 1)) * 8)
                flags = struct.unpack("Q", kf.read(8))[0]
                present += 1
                compound += bool(flags >> 15 & 3)  # KPF_COMPOUND_HEAD or KPF_COMPOUND_TAIL
        return compound / present if present else float("nan")
    finally:
        del pages
        m.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/mlfs-bounds"))
    args = ap.parse_args()
    with bench_store(args.work, args.size_gib) as (env, endpoint, server, src, manifest):
        size = src.stat().st_size
        chunks = [c for f in json.loads(manifest.read_text())["files"] if f["path"] == "model.safetensors"
                  for c in f["chunks"]]

        # -- cold -------------------------------------------------------------------------------------
        dl = args.work / "download"
        drop_caches()
        s0, c0, t = cpu_seconds(server.pid), children_cpu(), time.perf_counter()
        subprocess.run([S5CMD, "--endpoint-url", endpoint, "cp", "s3://bench/raw/model.safetensors", str(dl)],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        row("cold", "s5cmd download", time.perf_counter() - t,
            {"server": cpu_seconds(server.pid) - s0, "client": children_cpu() - c0})
        dl.unlink()

        from mlfs.stores import open_store
        store = open_store("s3://bench/mlfs")
        store.get_chunk(chunks[0][0])  # connection and credentials set up outside the timing
        drop_caches()
        s0, c0, t = cpu_seconds(server.pid), time.process_time(), time.perf_counter()
        with ThreadPoolExecutor(16) as ex:
            list(ex.map(lambda c: store.get_chunk_verified(c[0], c[1]), chunks))
        row("cold", f"mlfs fetch only ({len(chunks)} GETs + blake3, 16 threads)", time.perf_counter() - t,
            {"server": cpu_seconds(server.pid) - s0, "client": time.process_time() - c0})

        cache = args.work / "cache"
        drop_caches()
        m = MlfsMount(args.work / "mnt-mlfs", manifest, cache)
        try:
            s0, m0 = cpu_seconds(server.pid), cpu_seconds(m.proc.pid)
            wall, reader = read_file(m.mnt / "model.safetensors")
            row("cold", "mlfs mount, cold read", wall,
                {"server": cpu_seconds(server.pid) - s0, "mount": cpu_seconds(m.proc.pid) - m0, "reader": reader})
        finally:
            m.close()

        # -- warm -------------------------------------------------------------------------------------
        files = [cache / "chunks" / cid[:2] / cid for cid, _ in chunks]
        drop_caches()
        c0, t = time.process_time(), time.perf_counter()
        with ThreadPoolExecutor(4) as ex:
            list(ex.map(lambda p: p.read_bytes(), files))
        row("warm", "disk: the chunk files, 4 threads", time.perf_counter() - t, {"reader": time.process_time() - c0})
        drop_caches()
        wall, reader = read_file(src, 8 << 20)
        row("warm", "disk: the model file, 8 MiB reads", wall, {"reader": reader})

        m = MlfsMount(args.work / "mnt-mlfs", manifest, cache, "--memory", str(2 * size))
        try:
            f = m.mnt / "model.safetensors"
            read_file(f)  # fills the mount's memory buffer
            best = None
            for _ in range(3):
                drop_file_pages(f)
                m0 = cpu_seconds(m.proc.pid)
                wall, reader = read_file(f)
                if best is None or wall < best[0]:
                    best = (wall, {"mount": cpu_seconds(m.proc.pid) - m0, "reader": reader})
            row("warm", "mlfs mount from its memory buffer (FUSE path alone, best of 3)", *best)
        finally:
            m.close()
        drop_caches()
        m = MlfsMount(args.work / "mnt-mlfs", manifest, cache)
        try:
            m0 = cpu_seconds(m.proc.pid)
            wall, reader = read_file(m.mnt / "model.safetensors")
            row("warm", "mlfs mount from its disk cache", wall, {"mount": cpu_seconds(m.proc.pid) - m0, "reader": reader})

            # -- page cache ---------------------------------------------------------------------------
            f = m.mnt / "model.safetensors"
            read_file(src)
            shares = {"mlfs": folio_share(f), "local": folio_share(src)}
            for label, path in (("mlfs mount", f), ("local file", src)):
                best = min(read_file(path) for _ in range(5))
                row("page cache", f"{label}: re-read, 1 MiB reads (best of 5)", best[0], {"reader": best[1]})
        finally:
            m.close()

    cores = os.cpu_count() or 1
    print(f"\nCPU budget of reading {size / GiB:.2f} GiB, s3rver on loopback, {cores} cores\n")
    print(f"  {'':<64} {'MB/s':>6} {'wall':>7} {'CPU (s)':<36} {'floor':>6}")
    for group, name, wall, cpu in rows:
        total = sum(cpu.values())
        parts = ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
        print(f"  {group + ': ' + name:<64} {size / wall / 1e6:6.0f} {wall:6.2f}s {parts:<36} "
              f"{total / cores:5.2f}s")
    print("\n  floor = the CPU of every process involved / cores: no faster on this machine")
    print(f"\n  page cache held in large folios: mlfs mount {shares['mlfs']:.0%}, local file {shares['local']:.0%}")


if __name__ == "__main__":
    main()
