"""Soak: concurrent random and sequential readers over several mounted models, through a faulty S3,
with a cache too small to hold them — every byte checked against the original files.

    python benchmarks/soak.py [--seconds 120] [--readers 8] [--rate 0.2] [--cache-size 40M] [--json]

A moto S3 server, the fault proxy (mlfs.faultproxy: 500/503, resets, truncated and bit-flipped
bodies, stalls), three MiniLM versions in one bucket, three mounts sharing one cache. Reports
requests, faults injected and survived, bytes verified, wrong bytes (must be 0), read errors, and the
peak RSS and open file descriptors of the mount processes. Exits 1 if a wrong byte was ever read.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import model_family  # noqa: E402
from _common import free_port, wait_port  # noqa: E402
from mlfs.faultproxy import FaultProxy  # noqa: E402

MLFS = [sys.executable, "-m", "mlfs"]


def proc_figures(pid: int) -> tuple[int, int, int]:
    """(VmRSS, VmHWM, open fds) of a process."""
    rss = hwm = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = 0
    return rss, hwm, fds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--readers", type=int, default=8)
    ap.add_argument("--rate", type=float, default=0.2)
    ap.add_argument("--cache-size", default="40M")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--drop-every", type=float, default=2.0,
                    help="drop the kernel page cache this often (s; root) so reads reach the mounts")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mlfs-soak-"))
    base = model_family.base_model_dir()
    variants = ["v1", "v2", "fp16"]
    dirs = {v: model_family.write_variant(base, work / "models" / v, v) for v in variants}
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "soak", "AWS_SECRET_ACCESS_KEY": "soak",
           "AWS_DEFAULT_REGION": "us-east-1", "MLFS_S3_READ_TIMEOUT": "1", "MLFS_S3_CONNECT_TIMEOUT": "1"}
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
    port = free_port()
    moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    mounts: list[tuple[Path, subprocess.Popen]] = []
    proxy = None
    try:
        wait_port(port, moto)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="soak")
        for v, d in dirs.items():
            subprocess.run([*MLFS, "generate", str(d), "--store", "s3://soak/m", "--id", "minilm", "--version", v,
                            "-o", str(work / f"{v}.json")], env={**env, "AWS_ENDPOINT_URL": endpoint},
                           check=True, capture_output=True)
        proxy = FaultProxy(endpoint, rate=args.rate, stall=1.5, seed=args.seed).start()
        cache = work / "cache"
        for v in variants:
            mnt = work / f"mnt-{v}"
            mnt.mkdir()
            p = subprocess.Popen([*MLFS, "mount", "--foreground", "--manifest", str(work / f"{v}.json"),
                                  "--cache-dir", str(cache), "--cache-size", args.cache_size, "--memory", "16M",
                                  "--log-file", str(work / f"mnt-{v}.log"), str(mnt)],
                                 env={**env, "AWS_ENDPOINT_URL": proxy.url}, stderr=subprocess.DEVNULL)
            mounts.append((mnt, p))
        for mnt, p in mounts:
            end = time.monotonic() + 120
            while not os.path.ismount(mnt):
                if p.poll() is not None or time.monotonic() > end:
                    raise SystemExit(f"mount {mnt} failed")
                time.sleep(0.1)
        originals = {}
        for v, d in dirs.items():
            for f in d.rglob("*"):
                if f.is_file():
                    originals[(v, f.relative_to(d).as_posix())] = f.read_bytes()
        keys = sorted(originals)
        weights = [max(1, len(originals[k]) >> 16) for k in keys]  # big files are read more

        stats = {"reads": 0, "bytes_verified": 0, "wrong_bytes": 0, "read_errors": 0}
        lock = threading.Lock()
        deadline = time.monotonic() + args.seconds
        figures = {p.pid: (0, 0, 0) for _, p in mounts}

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                v, rel = rng.choices(keys, weights)[0]
                want = originals[(v, rel)]
                path = work / f"mnt-{v}" / rel
                try:
                    with open(path, "rb", buffering=0) as f:
                        if rng.random() < 0.3:  # sequential from a random point
                            off = rng.randrange(max(1, len(want)))
                            for _ in range(16):
                                data = os.pread(f.fileno(), 256 << 10, off)
                                check(data, want, off)
                                off += len(data)
                                if not data:
                                    break
                        else:
                            for _ in range(8):
                                off = rng.randrange(len(want) + 100)
                                data = os.pread(f.fileno(), rng.randrange(1, 2 << 20), off)
                                check(data, want, off)
                except OSError:
                    with lock:
                        stats["read_errors"] += 1

        def check(data: bytes, want: bytes, off: int) -> None:
            expected = want[off:off + len(data)]
            wrong = 0 if data == expected else sum(a != b for a, b in zip(data, expected)) + abs(len(data) - len(expected))
            with lock:
                stats["reads"] += 1
                stats["bytes_verified"] += len(data)
                stats["wrong_bytes"] += wrong

        drops = [0]

        def sampler() -> None:
            last_drop = time.monotonic()
            while time.monotonic() < deadline:
                if args.drop_every and time.monotonic() - last_drop >= args.drop_every:
                    try:
                        Path("/proc/sys/vm/drop_caches").write_text("1\n")
                        drops[0] += 1
                    except OSError:
                        pass
                    last_drop = time.monotonic()
                for _, p in mounts:
                    rss, hwm, fds = proc_figures(p.pid)
                    old = figures[p.pid]
                    figures[p.pid] = (max(old[0], rss), max(old[1], hwm), max(old[2], fds))
                time.sleep(0.5)

        threads = [threading.Thread(target=reader, args=(args.seed * 100 + i,)) for i in range(args.readers)]
        threads.append(threading.Thread(target=sampler))
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - start
        mount_stats = [json.loads(subprocess.run([*MLFS, "stats", "--json", str(m)], capture_output=True,
                                                 text=True).stdout or "{}") for m, _ in mounts]
        cache_bytes = sum(f.stat().st_size for f in (cache / "chunks").rglob("*") if f.is_file())
        alive = all(p.poll() is None for _, p in mounts)
    finally:
        for mnt, p in mounts:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        if proxy:
            proxy.stop()
        moto.terminate()
    c = proxy.counts
    report = {
        "seconds": round(elapsed, 1), "readers": args.readers, "mounts": len(mounts), **stats,
        "store_requests": c["requests"] + c["refused_down"], "faults_injected": c["faults"],
        "faults_by_kind": {k: c[k] for k in ("error", "reset", "truncate", "stall", "flip")},
        "faults_survived": c["faults"] if stats["read_errors"] == 0 and alive else None,
        "retries": sum(s.get("retries", 0) for s in mount_stats),
        "corrupt_bodies_refetched": sum(s.get("corrupt_chunks", 0) for s in mount_stats),
        "mounts_alive": alive, "page_cache_drops": drops[0],
        "peak_rss_mib": [round(f[1] / 2**20) for f in figures.values()],
        "max_open_fds": [f[2] for f in figures.values()],
        "cache_bytes_on_disk": cache_bytes, "cache_limit": args.cache_size,
    }
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k:<26} {v}")
    subprocess.run(["rm", "-rf", str(work)])
    sys.exit(1 if stats["wrong_bytes"] or not alive else 0)


if __name__ == "__main__":
    main()
