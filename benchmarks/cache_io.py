"""Chunk-file I/O of the cache: through the page cache vs O_DIRECT, side by side (docs/adr/0008).

    python benchmarks/cache_io.py [--gib 1] [--dir /var/tmp/mlfs-cacheio]

Writes and reads --gib of 4 MiB chunk files with `mlfs.directio` both ways (page cache dropped before
each read pass; root needed for that) and prints wall time and the process's user/system CPU.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import drop_caches  # noqa: E402

from mlfs import directio  # noqa: E402

CHUNK = 4 << 20


def timed(fn) -> tuple[float, float, float]:
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    return t1 - t0, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/mlfs-cacheio"))
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    n = int(args.gib * (1 << 30)) // CHUNK
    data = directio.buffer(CHUNK)
    data[:] = os.urandom(CHUNK)
    if not directio.supported(args.dir.parent):
        sys.exit(f"O_DIRECT is not supported under {args.dir.parent}")
    print(f"{n} chunk files of 4 MiB ({n * CHUNK / 2**30:.2f} GiB) in {args.dir}")
    print(f"{'pass':<22} {'wall s':>7} {'MB/s':>7} {'user s':>7} {'sys s':>7}")
    for _ in range(args.rounds):
        for direct in (False, True):
            label = "O_DIRECT" if direct else "page cache"
            shutil.rmtree(args.dir, ignore_errors=True)
            args.dir.mkdir(parents=True)
            os.sync()

            def write() -> None:
                for i in range(n):
                    directio.write_file(args.dir / str(i), data, direct)

            def read() -> None:
                for i in range(n):
                    assert directio.read_file(args.dir / str(i), CHUNK, direct) is not None

            for what, fn in (("write", write), ("read", read)):
                if what == "read":
                    os.sync()
                    drop_caches()
                wall, user, sys_ = timed(fn)
                print(f"{what + ' ' + label:<22} {wall:7.2f} {n * CHUNK / wall / 1e6:7.0f} "
                      f"{user:7.2f} {sys_:7.2f}")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
