"""Where the CPU of a cold load goes: s5cmd's download + the local load, against mlfs's mount
command, its daemon and the same load through the mount, over a shaped link.

    python benchmarks/cpu_split.py [--rounds 3] [--size-mib 544] [--mbit 1000] [-- MOUNT ARGS]

The set-up is load_bench.py's: s3rver in a network namespace behind a ``tc tbf`` veth link, the
LLM-shaped model stored compressed (the default).  Each round: s5cmd downloads the file and the
loader (``load_file`` + a copy of every tensor) reads it from the page cache s5cmd filled; an
interpreter that only imports torch and safetensors (the loader's fixed cost); then a fresh
mount with an empty cache and the page cache dropped, and the same loader through it.  Printed:
every figure per round and its median, CPU in seconds, so a change to the daemon shows in the
daemon's row without the loader's ±0.3 s of interpreter start (load_bench.py reports the sums as
ratios).  ``MLFS_*`` variables in the environment reach the mount (A/B switches such as
``MLFS_KEEP_PUSHED=1``).  Needs root.

Floors, in the same rounds: ``curl`` GETting the raw file once to ``/dev/null`` (the socket's
receive alone, one connection) and once to a file (receive plus the page-cache write that
s5cmd's download also does); the mount's fixed start (its command, and its daemon once mounted,
before any read); and the daemon's work that s5cmd does not do at all, timed on the chunks of
the model in one thread of a fresh interpreter (blake3 over every chunk, decoding the
compressed ones).  A data plane
with no overhead of its own would need about: receive + page-cache write (the pushes) + that
work + the fixed start (docs/adr/0030).  The same floor measured as one piece: the model's
chunks fetched, checked, decoded and written into the page cache by 8 plain threads of a fresh
interpreter (:func:`plain_work`; docs/adr/0031); the daemon's CPU beyond that and its fixed
start is what FUSE, trio and the disk cache cost.  The same threads once more, each chunk also
admitted to a disk cache as the daemon admits it (``ChunkCache.put`` in 2 writer threads): what
is left beyond that is FUSE, trio and the pushes (docs/adr/0038).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load_bench as lb  # noqa: E402
from _common import ShapedLink, drop_caches, s3rver_env, s3rver_in, vm_state  # noqa: E402


def child_cpu(before: resource.struct_rusage) -> float:
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=544)
    ap.add_argument("--mbit", type=int, default=1000)
    ap.add_argument("mount_args", nargs="*", help="extra mlfs mount options")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlfs-cpu-"))
    env = s3rver_env()
    link = ShapedLink("mlfs-cpu", args.mbit, subnet="10.79.0")
    server = None
    try:
        v1, _ = lb.make_llm(work / "models", args.size_mib << 20)
        path = v1 / "model.safetensors"
        link.up()
        (work / "s3").mkdir()
        server, endpoint = s3rver_in(link, lb.S3RVER, work / "s3")
        env["AWS_ENDPOINT_URL"] = endpoint
        subprocess.run([lb.S5CMD, "--endpoint-url", endpoint, "cp", str(path), "s3://bench/raw/"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        store = "s3://bench/models"
        subprocess.run([lb.PY, "-m", "mlfs", "generate", str(v1), "--store", store, "--id", "llm",
                        "--version", "v1"], env=env, check=True, capture_output=True)
        rows: dict[str, list[float]] = {}
        dl = work / "dl" / "model.safetensors"
        for n in range(args.rounds):
            lb.log(f"round {n + 1} of {args.rounds}")
            drop_caches()
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run([lb.S5CMD, "--endpoint-url", endpoint, "cp",
                            "s3://bench/raw/model.safetensors", str(dl)], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            lb.add(rows, "s5cmd download", child_cpu(before))
            lb.add(rows, "loader, local file (after s5cmd)", lb.run_py(lb.LOAD_FILE, dl)[1])
            lb.add(rows, "interpreter + torch import only",
                   lb.run_py("import torch, safetensors.torch; print(0)")[1])
            for name, out in (("curl GET -> /dev/null (receive only)", "/dev/null"),
                              ("curl GET -> file (receive + page cache)", str(work / "curl.out"))):
                drop_caches()
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                subprocess.run(["curl", "-sf", "-o", out, f"{endpoint}/bench/raw/model.safetensors"],
                               check=True)
                lb.add(rows, name, child_cpu(before))
            (work / "curl.out").unlink(missing_ok=True)
            drop_caches()
            lb.add(rows, "plain threads: GET, verify, decode, write", plain_work(store, env, work))
            drop_caches()
            lb.add(rows, "plain threads, and disk cache admission",
                   plain_work(store, env, work, admit=True))
            shutil.rmtree(work / "cache", ignore_errors=True)
            drop_caches()
            m = lb.Mount(work / "mnt", work / "cache", "--store", store, "--id", "llm",
                         "--version", "v1", *args.mount_args, env=env)
            try:
                lb.add(rows, "mlfs mount command", m.start_cpu)
                time.sleep(1.0)
                lb.add(rows, "mlfs daemon, mounted, before any read", m.cpu())
                reader = lb.run_py(lb.LOAD_FILE, m.mnt / "model.safetensors")[1]
                lb.add(rows, "mlfs daemon", m.cpu())
                lb.add(rows, "loader, through the mount", reader)
                lb.add(rows, "mlfs received MB", m.stats()["received_bytes"] / 1e6)
            finally:
                m.close()
        for k, v in rows.items():
            print(f"{k:36s} median {statistics.median(v):8.3f}   " + " ".join(f"{x:.3f}" for x in v))
        s5 = statistics.median(rows["s5cmd download"]) + statistics.median(rows["loader, local file (after s5cmd)"])
        ml = sum(statistics.median(rows[k]) for k in ("mlfs mount command", "mlfs daemon",
                                                      "loader, through the mount"))
        print(f"mlfs (command + daemon + loader) / (s5cmd + loader): {ml / s5:.3f}")
        print(f"this VM: {vm_state()}")
        extra = own_work(store, env)
        print(f"blake3 of every chunk, decoding of the compressed ones (one thread): {extra:.3f}")
        med = {k: statistics.median(v) for k, v in rows.items()}
        floor = (med["curl GET -> file (receive + page cache)"] + extra
                 + med["mlfs mount command"] + med["mlfs daemon, mounted, before any read"])
        print(f"a daemon with no overhead of its own would need ~{floor:.3f} s against s5cmd's "
              f"{med['s5cmd download']:.3f} s; (that + loader) / (s5cmd + loader): "
              f"{(floor + med['loader, through the mount']) / s5:.3f}")
        plain = (med["plain threads: GET, verify, decode, write"] + med["mlfs mount command"]
                 + med["mlfs daemon, mounted, before any read"])
        print(f"the same work in plain threads, plus the mount's start: ~{plain:.3f} s; "
              f"(that + loader) / (s5cmd + loader): "
              f"{(plain + med['loader, through the mount']) / s5:.3f}; the daemon's own overhead "
              f"(FUSE, trio, the disk cache) ~{med['mlfs daemon'] + med['mlfs mount command'] - plain:.3f} s")
        admitted = plain + med["plain threads, and disk cache admission"] - med[
            "plain threads: GET, verify, decode, write"]
        ratio = (admitted + med["loader, through the mount"]) / s5
        beyond = med["mlfs daemon"] + med["mlfs mount command"] - admitted
        print(f"the same with each chunk admitted to a disk cache: ~{admitted:.3f} s; "
              f"(that + loader) / (s5cmd + loader): {ratio:.3f}; the daemon's own overhead "
              f"beyond that (FUSE, trio, the pushes) ~{beyond:.3f} s")
    finally:
        if server is not None:
            server.terminate()
        link.down()
        shutil.rmtree(work, ignore_errors=True)


#: Code for a fresh interpreter: the stored model's file entry *f* from store *s* (``argv[1]``).
MODEL = ("from mlfs.stores import open_store\n"
         "s = open_store(sys.argv[1]); m = s.load_manifest('llm', 'v1')\n"
         "f = next(f for f in m.files if f.path == 'model.safetensors')\n")


def plain_work(store: str, env, work: Path, admit: bool = False) -> float:
    """CPU seconds, in a fresh interpreter with the daemon's malloc settings, to do a cold load's
    data work without FUSE, trio or the disk cache: GET every chunk of the model (8 threads, the
    mount's direct path), check and decode it, and write it at its offset into a file (the page
    cache, as the mount's pushes fill it).  The interpreter's start and imports are not counted.
    *admit*: each chunk is also admitted to a disk cache (``ChunkCache.put``: its file, seal,
    block checksums and index row) by 2 writer threads, as the daemon admits them."""
    code = ("import os, sys, resource; from concurrent.futures import ThreadPoolExecutor\n"
            "from mlfs.buffers import reuse_freed_memory\n"
            "from mlfs.cache import ChunkCache\n"
            "reuse_freed_memory()\n" + MODEL +
            "fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)\n"
            "cache = ChunkCache(sys.argv[3], 1 << 40) if sys.argv[3] else None\n"
            "writer = ThreadPoolExecutor(2)\n"
            "def one(job):\n"
            "    c, n, off = job\n"
            "    data = s.get_chunk_verified(c, n)\n"
            "    os.pwrite(fd, data, off)\n"
            "    if cache is not None:\n"
            "        writer.submit(cache.put, c, data)\n"
            "def cpu():\n"
            "    r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime + r.ru_stime\n"
            "c0 = cpu()\n"
            "with ThreadPoolExecutor(8) as pool:\n"
            "    list(pool.map(one, zip(f.chunk_ids, f.chunk_sizes, f.offsets)))\n"
            "writer.shutdown()\n"
            "print(cpu() - c0)")
    out, cache = work / "plain.out", work / "plain-cache"
    try:
        res = subprocess.run([lb.PY, "-c", code, store, str(out), str(cache) if admit else ""],
                             env=env, check=True, capture_output=True, text=True).stdout
    finally:
        out.unlink(missing_ok=True)
        shutil.rmtree(cache, ignore_errors=True)
    return float(res.split()[-1])


def own_work(store: str, env) -> float:
    """CPU seconds, in a fresh interpreter, to check every chunk of the stored model with blake3
    and to decode those stored compressed: work the mount does and s5cmd does not."""
    code = ("import sys, time; from mlfs import codec\n" + MODEL +
            "bodies = [(c, n, s.get_chunk(c)) for c, n in zip(f.chunk_ids, f.chunk_sizes)]\n"
            "t = time.process_time()\n"
            "for c, n, b in bodies:\n"
            "    assert codec.verified(c, b, n, 1 << 26) is not None\n"
            "print(time.process_time() - t)")
    out = subprocess.run([lb.PY, "-c", code, store], env=env, check=True, capture_output=True,
                         text=True).stdout
    return float(out.split()[-1])


if __name__ == "__main__":
    main()
