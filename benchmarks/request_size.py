"""What the size of a GET costs the S3 server: the same GiB fetched as mlfs's chunk objects and as
ranged GETs of 4, 16 and 64 MiB from one object, 8 requests at a time, s3rver's CPU measured for each.

    python benchmarks/request_size.py [--size-gib 1]

The client side is the same lean GET for every row (botocore's SigV4 signer + urllib3, the body read
into a reused buffer, nothing verified or stored), so the rows differ in request count only; s5cmd's
download of the same object, in the same passes, is the reference (a Go client, writing to disk).  This
is the measurement behind the "fewer, larger requests" item of the README (docs/adr/0011).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import sys

sys.path.insert(0, str(Path(__file__).resolve().parent))

import boto3  # noqa: E402
import urllib3  # noqa: E402
from botocore.auth import S3SigV4Auth  # noqa: E402
from botocore.awsrequest import AWSRequest  # noqa: E402

from _common import drop_caches  # noqa: E402
from mount_bench import S5CMD, bench_store, cpu_seconds  # noqa: E402

MiB = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/mlfs-request-size"))
    args = ap.parse_args()
    with bench_store(args.work, args.size_gib) as (env, endpoint, server, src, manifest):
        size = src.stat().st_size
        creds = boto3.Session().get_credentials().get_frozen_credentials()
        pool = urllib3.PoolManager(maxsize=args.threads, retries=False)
        local = threading.local()

        def get(url: str, rng: tuple[int, int] | None) -> int:
            headers = {"Range": f"bytes={rng[0]}-{rng[1] - 1}"} if rng else {}
            req = AWSRequest(method="GET", url=url, headers=headers)
            S3SigV4Auth(creds, "s3", "us-east-1").add_auth(req)
            resp = pool.request("GET", url, headers=dict(req.headers.items()), preload_content=False)
            buf = getattr(local, "buf", None)
            if buf is None or len(buf) < 64 * MiB:
                buf = local.buf = memoryview(bytearray(64 * MiB))
            n = 0
            while True:
                k = resp.readinto(buf[n:])
                if not k:
                    break
                n += k
            resp.release_conn()
            if resp.status not in (200, 206):
                raise SystemExit(f"GET {url}: HTTP {resp.status}")
            return n

        chunks = [c for f in json.loads(manifest.read_text())["files"] if f["path"] == "model.safetensors"
                  for c in f["chunks"]]
        shapes = [(f"mlfs chunk objects ({len(chunks)} GETs)",
                   [(f"{endpoint}/bench/mlfs/chunks/{cid[:2]}/{cid}", None) for cid, _ in chunks])]
        raw = f"{endpoint}/bench/raw/model.safetensors"
        for part in (4, 16, 64):
            ranges = [(raw, (o, min(o + part * MiB, size))) for o in range(0, size, part * MiB)]
            shapes.append((f"ranged GETs of {part} MiB ({len(ranges)} GETs)", ranges))
        rows = []
        dl = args.work / "download"
        for _ in range(2):  # two passes, interleaved: this VM's speed drifts
            dl.unlink(missing_ok=True)
            drop_caches()
            s0, t = cpu_seconds(server.pid), time.perf_counter()
            subprocess.run([S5CMD, "--endpoint-url", endpoint, "cp", "s3://bench/raw/model.safetensors",
                            str(dl)], env=env, check=True, stdout=subprocess.DEVNULL)
            rows.append(("s5cmd cp, 50 MiB parts (reference)", size, time.perf_counter() - t,
                         cpu_seconds(server.pid) - s0, float("nan")))
            for label, reqs in shapes:
                drop_caches()
                s0, c0, t = cpu_seconds(server.pid), time.process_time(), time.perf_counter()
                with ThreadPoolExecutor(args.threads) as ex:
                    got = sum(ex.map(lambda r: get(*r), reqs))
                rows.append((label, got, time.perf_counter() - t, cpu_seconds(server.pid) - s0,
                             time.process_time() - c0))
    print(f"\nGET size vs S3 server CPU, {size / 2**30:.2f} GiB, s3rver on loopback, "
          f"{args.threads} requests at a time, {os.cpu_count()} cores\n")
    print(f"  {'shape':<40} {'MB/s':>6} {'s3rver CPU':>11} {'client CPU':>11}")
    for label, got, dt, server_cpu, client_cpu in rows:
        client = "-" if client_cpu != client_cpu else f"{client_cpu:9.2f} s"  # nan: not measured
        print(f"  {label:<40} {got / dt / 1e6:6.0f} {server_cpu:9.2f} s {client:>11}")


if __name__ == "__main__":
    main()
