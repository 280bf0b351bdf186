"""v2 after v1 with and without the whole copies a switch writes (docs/adr/0036), interleaved.

    python benchmarks/switch_copy_ab.py [--rounds 3] [--size-mib 544] [--mbit 1000]

load_bench.py's set-up: s3rver in a network namespace behind a shaped link, its LLM-shaped v1
and v2 (1/6 of the tensors changed).  v1 is loaded cold once through a mount, which leaves its
chunks and its whole copy in a cache.  Each round then, for a checked and a ``--warm`` switch,
twice: a mount at v1 over a copy of that cache, the page cache dropped, ``mlfs switch`` to v2,
and a ``load_file`` process through the mount (whole wall time, as load_bench's "v2 after v1";
with ``--warm-libraries`` torch is imported once after the page cache is dropped).
"copies" keeps v1's whole copy, so the switch writes v2's; "no copies" removes ``files/`` from
the cache first, which is what a switch did before ADR 0036.  Medians and every round printed.
Needs root.
"""

from __future__ import annotations

import argparse
import json
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


KINDS = ("copies", "no copies")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=544)
    ap.add_argument("--mbit", type=int, default=1000)
    ap.add_argument("--warm-libraries", action="store_true",
                    help="import torch once after dropping the page cache: a host whose serving "
                         "stack is warm and whose model changes")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlfs-switch-copy-"))
    env = s3rver_env()
    link = ShapedLink("mlfs-swcopy", args.mbit, subnet="10.79.0")
    server = None
    mounts: list[lb.Mount] = []
    runs: dict[str, list[float]] = {}
    try:
        v1, v2 = lb.make_llm(work / "models", args.size_mib << 20)
        link.up()
        (work / "s3").mkdir()
        server, endpoint = s3rver_in(link, lb.S3RVER, work / "s3")
        env["AWS_ENDPOINT_URL"] = endpoint
        store = "s3://bench/models"
        for v, d in (("v1", v1), ("v2", v2)):
            subprocess.run([lb.PY, "-m", "mlfs", "generate", str(d), "--store", store, "--id",
                            "llm", "--version", v, "-o", str(work / f"{v}.json")], env=env,
                           check=True, capture_output=True)
        _, first = lb.cold_load(work, "v1", store, mounts, env)
        if not first.settle():
            raise SystemExit("v1 got no whole copy: is passthrough on (root, kernel >= 6.9)?")
        first.close()
        for n in range(args.rounds):
            for kind in KINDS:
                for switch in ("checked", "--warm"):
                    cache = work / "cache-v2"
                    shutil.rmtree(cache, ignore_errors=True)
                    shutil.copytree(work / "cache-v1", cache)
                    if kind == "no copies":
                        shutil.rmtree(cache / "files")
                    m = lb.Mount(work / "mnt-v2", cache, "--store", store, "--id", "llm",
                                 "--version", "v1", env=env)
                    mounts.append(m)
                    drop_caches()
                    if args.warm_libraries:
                        subprocess.run([lb.PY, "-c", "import torch, safetensors.torch"], check=True)
                    t = time.perf_counter()
                    out = subprocess.run(
                        [lb.PY, "-m", "mlfs", "switch", "--json", str(m.mnt), str(work / "v2.json"),
                         *([switch] if switch == "--warm" else [])],
                        env=env, check=True, capture_output=True, text=True).stdout
                    flipped = time.perf_counter() - t
                    load = lb.run_py(lb.LOAD_FILE, m.mnt / "model.safetensors")[0][0]
                    total = time.perf_counter() - t
                    s = m.stats()
                    key = f"{kind}, {switch} switch + load"
                    runs.setdefault(key, []).append(total)
                    runs.setdefault(f"{kind}, {switch}: load in the process", []).append(load)
                    lb.log(f"round {n + 1}, {key}: {total:.2f} s (switch {flipped:.2f} s, load in "
                           f"the process {load:.2f} s, passed-through opens "
                           f"{s['passthrough_opens']}, copies asked for "
                           f"{json.loads(out).get('whole_copies', 0)})")
                    m.close()
        report = {k: {"median": round(statistics.median(v), 3), "runs": [round(x, 3) for x in v]}
                  for k, v in runs.items()}
        for switch in ("checked", "--warm"):
            report[f"copies / no copies, {switch}"] = round(
                report[f"copies, {switch} switch + load"]["median"]
                / report[f"no copies, {switch} switch + load"]["median"], 3)
            report[f"copies / no copies, {switch}, load in the process"] = round(
                report[f"copies, {switch}: load in the process"]["median"]
                / report[f"no copies, {switch}: load in the process"]["median"], 3)
        print(json.dumps(report, indent=1))
    finally:
        for m in mounts:
            m.close()
        if server is not None:
            server.terminate()
        link.down()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
