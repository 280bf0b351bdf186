"""Two mounts of one cache on one host (two replicas of a server), loading the same model over a
shaped link: what crosses the link and how long each load takes, with the mounts sharing their
fetches (docs/adr/0040) and without (``MLFS_PEER_READS=0``, the way before it).

    python benchmarks/shared_cache.py [--rounds 3] [--size-mib 544] [--mbit 1000] [--delays 0,2]

The set-up is load_bench.py's: s3rver in a network namespace behind a ``tc tbf`` veth link, the
LLM-shaped model stored compressed.  Each round, for each delay and each way (interleaved): an
empty cache, the page cache dropped, two fresh mounts of that cache; the loader (``load_file`` +
a copy of every tensor, a process each) starts on the first mount, and *delay* seconds later on
the second.  Printed: medians of each process's time and of the bytes each mount received, and
the second mount's chunks read from the first's copy being written.  Needs root.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load_bench as lb  # noqa: E402
from _common import ShapedLink, drop_caches, s3rver_env, s3rver_in  # noqa: E402

WAYS = {"shared (default)": {}, "not shared (MLFS_PEER_READS=0)": {"MLFS_PEER_READS": "0"}}
COLUMNS = ("first's process s", "second's process s", "first received MB",
           "second received MB", "second's reads from the first's copy")


def two_loads(store: str, env: dict, work: Path, delay: float) -> list[float]:
    shutil.rmtree(work / "cache", ignore_errors=True)
    drop_caches()
    a = lb.Mount(work / "a", work / "cache", "--store", store, "--id", "llm", "--version", "v1",
                 env=env)
    try:
        b = lb.Mount(work / "b", work / "cache", "--store", store, "--id", "llm", "--version",
                     "v1", env=env)
    except BaseException:
        a.close()
        raise
    try:
        t0 = time.perf_counter()
        pa = subprocess.Popen([lb.PY, "-c", lb.LOAD_FILE, str(a.mnt / "model.safetensors")],
                              stdout=subprocess.DEVNULL)
        time.sleep(delay)
        t1 = time.perf_counter()
        pb = subprocess.Popen([lb.PY, "-c", lb.LOAD_FILE, str(b.mnt / "model.safetensors")],
                              stdout=subprocess.DEVNULL)
        if pb.wait() != 0:
            raise RuntimeError("the load through the second mount failed")
        second = time.perf_counter() - t1
        if pa.wait() != 0:
            raise RuntimeError("the load through the first mount failed")
        first = time.perf_counter() - t0
        sa, sb = a.stats(), b.stats()
        return [first, second, sa["received_bytes"] / 1e6, sb["received_bytes"] / 1e6,
                sb.get("peer_assembled_reads", 0)]
    finally:
        a.close()
        b.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=544)
    ap.add_argument("--mbit", type=int, default=1000)
    ap.add_argument("--delays", default="0,2", help="seconds between the two loads' starts")
    args = ap.parse_args()
    delays = [float(d) for d in args.delays.split(",")]
    work = Path(tempfile.mkdtemp(prefix="mlfs-shared-"))
    env = s3rver_env()
    link = ShapedLink("mlfs-shr", args.mbit, subnet="10.81.0")
    server = None
    rows: dict[tuple[float, str], list[list[float]]] = {}
    try:
        v1, _ = lb.make_llm(work / "models", args.size_mib << 20)
        link.up()
        (work / "s3").mkdir()
        server, endpoint = s3rver_in(link, lb.S3RVER, work / "s3")
        env["AWS_ENDPOINT_URL"] = endpoint
        store = "s3://bench/models"
        subprocess.run([lb.PY, "-m", "mlfs", "generate", str(v1), "--store", store, "--id", "llm",
                        "--version", "v1"], env=env, check=True, capture_output=True)
        for n in range(args.rounds):
            for delay in delays:
                for way, extra in WAYS.items():
                    lb.log(f"round {n + 1} of {args.rounds}: second load {delay:g} s later, {way}")
                    rows.setdefault((delay, way), []).append(
                        two_loads(store, {**env, **extra}, work, delay))
    finally:
        if server is not None:
            server.terminate()
        link.down()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.size_mib} MiB model, {args.mbit} Mbit/s link, medians of {args.rounds} rounds")
    print("| second load starts | way | " + " | ".join(COLUMNS) + " | MB over the link |")
    print("|---" * (len(COLUMNS) + 3) + "|")
    for (delay, way), rs in rows.items():
        med = [statistics.median(c) for c in zip(*rs)]
        print(f"| {delay:g} s later | {way} | " + " | ".join(f"{x:.2f}" for x in med)
              + f" | {med[2] + med[3]:.0f} |")


if __name__ == "__main__":
    main()
