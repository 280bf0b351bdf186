"""The mount's data-plane S3 client (the direct GET path, docs/adr/0010) over plain http — its
own sockets (mlfs.rawhttp, docs/adr/0020) and urllib3 (https's path) — against obstore (Rust
object_store bindings): CPU per GiB and wall time to GET the same objects, each verified with
blake3 as the mount does.

    python benchmarks/get_client.py [--objects 96] [--size-mib 4] [--threads 12]

s3rver runs in a network namespace behind a 1 Gbit/s ``tc tbf`` link (as in load_bench.py), so the
server's CPU is not the client's; the figure that matters is the *client's* CPU (this process, all
threads), which competes with the loader for the host's cores.  Issue 13 asked to adopt a leaner
client only on these numbers.  Needs root; obstore is in the ``bench`` extra.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import ShapedLink, s3rver_env, s3rver_in  # noqa: E402

S3RVER = os.environ.get("S3RVER", "/opt/s3rver/node_modules/.bin/s3rver")
GiB = 1 << 30


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(name: str, fn, keys: list[str], threads: int, size: int, out: dict) -> None:
    c0, t0 = cpu(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for key, data in zip(keys, pool.map(fn, keys)):
            assert len(data) == size and blake3.blake3(data).hexdigest() == key.rsplit("/", 1)[-1]
    wall, used = time.perf_counter() - t0, cpu() - c0
    gib = len(keys) * size / GiB
    out[name] = (wall, used / gib)
    print(f"{name:<34} {len(keys) * size / wall / 1e6:8.1f} MB/s  {used / gib:6.2f} s CPU/GiB",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=96)
    ap.add_argument("--size-mib", type=int, default=4)
    ap.add_argument("--threads", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    size = args.size_mib << 20
    env = s3rver_env()
    link = ShapedLink("mlfs-get", 1000, subnet="10.80.0")
    work = Path(tempfile.mkdtemp(prefix="mlfs-get-"))
    server = None
    try:
        link.up()
        server, endpoint = s3rver_in(link, S3RVER, work)
        os.environ.update(env, AWS_ENDPOINT_URL=endpoint)
        from mlfs.stores import open_store

        store = open_store("s3://bench")
        keys = []
        for i in range(args.objects):
            data = os.urandom(size)
            key = f"chunks/{blake3.blake3(data).hexdigest()}"
            store._put(key, data)
            keys.append(key)
        assert store.direct is not None

        import obstore
        from obstore.store import S3Store as ObStore

        ob = ObStore("bench", endpoint=endpoint, access_key_id="S3RVER",
                     secret_access_key="S3RVER", region="us-east-1", virtual_hosted_style_request=False,
                     client_options={"allow_http": True})
        assert store.direct.raw is not None  # plain http: mlfs.rawhttp
        via_urllib3 = open_store("s3://bench")
        via_urllib3.direct.raw = None  # what https and MLFS_RAW_HTTP=0 take

        results: dict[str, list] = {}
        for _ in range(args.rounds):
            r: dict = {}
            timed("mlfs direct GET, mlfs.rawhttp", lambda k: store.direct.get(k, k), keys,
                  args.threads, size, r)
            timed("mlfs direct GET, urllib3", lambda k: via_urllib3.direct.get(k, k), keys,
                  args.threads, size, r)
            timed("obstore get (Rust, threads)", lambda k: obstore.get(ob, k).bytes(), keys,
                  args.threads, size, r)
            for k, v in r.items():
                results.setdefault(k, []).append(v)
        print("\nmedians over rounds:")
        for k, v in results.items():
            walls = sorted(w for w, _ in v)
            cpus = sorted(c for _, c in v)
            print(f"{k:<34} {walls[len(walls) // 2]:.2f} s  {cpus[len(cpus) // 2]:.2f} s CPU/GiB")
    finally:
        if server is not None:
            server.terminate()
        link.down()
        subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    main()
