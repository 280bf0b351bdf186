"""safe_open over every tensor (each cloned, so every byte is read) through a warm mlfs mount, for
several kernel read-ahead sizes, beside the same load from local disk (page cache dropped before each
run; needs root).

    python benchmarks/readahead_sweep.py MANIFEST CACHE_DIR LOCAL_FILE [--sizes 1M,4M,16M]

MANIFEST's chunks must already be in CACHE_DIR (mount it once and read it), so the store is not
involved; LOCAL_FILE is the same model.safetensors on local disk.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import drop_caches  # noqa: E402

# get_tensor returns a tensor backed by safetensors' mmap: clone() makes the load read every byte
# (benchmarks/mount_bench.py says why).
LOAD = ("import sys,time,torch; from safetensors import safe_open; t=time.perf_counter(); "
        "f=safe_open(sys.argv[1],'pt'); d=[f.get_tensor(k).clone() for k in f.keys()]; "
        "print(time.perf_counter()-t)")


def load(path: str) -> float:
    drop_caches()
    return float(subprocess.run([sys.executable, "-c", LOAD, path], capture_output=True, text=True,
                                check=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("manifest")
    ap.add_argument("cache_dir")
    ap.add_argument("local_file")
    ap.add_argument("--sizes", default="128K,1M,4M,16M")
    args = ap.parse_args()
    local = load(args.local_file)
    print(f"local disk: {local:.2f} s")
    for ra in args.sizes.split(","):
        mnt = Path(tempfile.mkdtemp(prefix="mlfs-ra-"))
        subprocess.run([sys.executable, "-m", "mlfs", "mount", "--manifest", args.manifest, "--cache-dir",
                        args.cache_dir, "--read-ahead", ra, str(mnt)], check=True, capture_output=True)
        try:
            t = load(str(mnt / Path(args.local_file).name))
            print(f"read-ahead {ra:>5}: {t:.2f} s  ({t / local:.2f}x local disk)")
        finally:
            subprocess.run([sys.executable, "-m", "mlfs", "umount", str(mnt)], check=True)
            mnt.rmdir()


if __name__ == "__main__":
    main()
