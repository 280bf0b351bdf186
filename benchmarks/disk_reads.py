"""How fast this disk gives back a model: the file itself through the page cache's read-ahead
(what a local ``load_file`` does) against the chunk cache's files, read as a warm stream reads
them (``O_DIRECT`` into huge pages, docs/adr/0019, 0023, 0025), into ordinary pages as before,
and through the page cache — with the average size of the requests the disk saw
(docs/adr/0024).

    python benchmarks/disk_reads.py [--rounds 4] [--size-mib 544] [--dir /var/tmp/mlfs-disk]

The LLM-shaped model of load_bench.py is written, stored with ``mlfs generate`` in a local store
and its chunks admitted to a chunk cache by ``ChunkCache.put`` (the mount's writer).  Each round
drops the page cache before each way and runs the ways in turn, so that the disk's drift between
minutes hits them alike.  Needs root (drop_caches); the request sizes come from
``/sys/dev/block/<dev>/stat`` and count everything else on the disk at the time too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import load_bench as lb  # noqa: E402
from _common import drop_caches  # noqa: E402

from mlfs import buffers, directio  # noqa: E402
from mlfs.cache import SEAL, ChunkCache  # noqa: E402
from mlfs.generate import generate  # noqa: E402
from mlfs.stores import open_store  # noqa: E402



def disk_stat(path: Path) -> tuple[int, int]:
    """(read requests, sectors read) of the block device holding *path*."""
    dev = os.stat(path).st_dev
    fields = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat").read_text().split()
    return int(fields[0]), int(fields[2])


def read_direct(files: list[str], threads: int, huge: bool = True) -> None:
    """As a warm stream loads chunks: O_DIRECT, in mlfs.directio's pieces, *threads* at once;
    into huge pages (docs/adr/0025) or, with *huge* false, into ordinary ones as before."""
    buffers.HUGE_PAGES = huge
    with ThreadPoolExecutor(threads) as ex:
        # Each buffer is dropped once read, as a warm stream drops a chunk once pushed (ADR 0024):
        # pooled huge-page regions are then reused (ADR 0025).
        list(ex.map(lambda f: len(directio.read_direct(f, os.path.getsize(f) + 1)), files))


def read_mapped(path: Path) -> None:
    """As a local ``load_file`` reads its file: mapped (``MAP_PRIVATE``) and faulted in order
    with ``MADV_SEQUENTIAL``, every page touched (safetensors 0.8's ``load_file`` maps lazily: the
    tensors it returns read the file as they are first used)."""
    import mmap

    import numpy as np

    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    try:
        m.madvise(mmap.MADV_SEQUENTIAL)
        pages = np.frombuffer(m, np.uint8)[::mmap.PAGESIZE]
        int(pages.sum())
        del pages
    finally:
        m.close()


def read_buffered(files: list[str], threads: int) -> None:
    def one(f: str) -> None:
        fd = os.open(f, os.O_RDONLY)
        try:
            obj, view, _ = buffers.unfilled(os.fstat(fd).st_size)
            os.readv(fd, [view])
            view.release()
        finally:
            os.close(fd)
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(one, files))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--size-mib", type=int, default=544)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/mlfs-disk"))
    args = ap.parse_args()
    work = args.dir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        v1, _ = lb.make_llm(work / "models", args.size_mib << 20)
        model = v1 / "model.safetensors"
        store = open_store(str(work / "store"), create=True)
        manifest = generate(v1, store, "llm", "v1").manifest
        cache = ChunkCache(work / "cache", 4 << 30)
        entry = next(f for f in manifest.files if f.path == "model.safetensors")
        for cid, size in zip(entry.chunk_ids, entry.chunk_sizes):
            cache.put(cid, store.get_chunk_verified(cid, size))
        files = [str(cache.path(c)) for c in entry.chunk_ids]
        total = sum(os.path.getsize(f) - SEAL for f in files)
        ways = {
            "model file, mapped as load_file maps it (read-ahead)": lambda: read_mapped(model),
            "chunk files, O_DIRECT, 3 threads (a warm stream)": lambda: read_direct(files, 3),
            "chunk files, O_DIRECT, 8 threads": lambda: read_direct(files, 8),
            "chunk files, O_DIRECT into 4 KiB pages, 3 threads (before ADR 0025)":
                lambda: read_direct(files, 3, huge=False),
            "chunk files, page cache, 3 threads": lambda: read_buffered(files, 3),
        }
        rows: dict[str, list[tuple[float, float]]] = {k: [] for k in ways}
        for n in range(args.rounds):
            for name, way in ways.items():
                drop_caches()
                ios0, sectors0 = disk_stat(work)
                t = time.perf_counter()
                got = way()
                took = time.perf_counter() - t
                del got
                ios, sectors = (a - b for a, b in zip(disk_stat(work), (ios0, sectors0)))
                rows[name].append((total / took / 1e6, sectors * 512 / max(ios, 1) / 1024))
        print(f"{total / 1e6:.0f} MB of tensors, {len(files)} chunk files, {args.rounds} rounds")
        for name, got in rows.items():
            rates = [r for r, _ in got]
            print(f"{name:50s} median {statistics.median(rates):6.0f} MB/s "
                  f"({min(rates):.0f}-{max(rates):.0f}), requests of "
                  f"{statistics.median(k for _, k in got):.0f} KiB on average")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
