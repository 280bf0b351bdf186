"""How long loading (parsing + validating) a manifest takes, for 1k to 100k tensors.

    python benchmarks/manifest_load.py

Beside it, plain `json.loads` of the same bytes: the floor any JSON manifest pays.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlfs import manifest as mf  # noqa: E402


def build(n: int) -> bytes:
    tensors = {f"model.layers.{i // 10}.proj_{i % 10}.weight": [i * 4096, (i + 1) * 4096, f"{i:016x}"]
               for i in range(n)}
    chunks = [[f"{i:064x}", 4096 * 16] for i in range(n // 16)]
    size = 4096 * 16 * (n // 16)
    doc = {"format": mf.FORMAT, "id": "big", "version": "v1", "files": [
        {"path": "model.safetensors", "size": size, "mode": 0o644, "blake3": "a" * 64,
         "chunks": chunks, "tensors": {k: v for k, v in tensors.items() if v[1] <= size}}]}
    return mf.from_json(doc).dumps()


def best(fn, runs=5) -> float:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def main() -> None:
    print(f"{'tensors':>8} {'bytes':>11} {'json.loads':>11} {'mlfs loads':>11} {'ratio':>6}")
    for n in (1_000, 10_000, 100_000):
        data = build(n)
        j = best(lambda: json.loads(data))
        m = best(lambda: mf.loads(data))
        print(f"{n:>8} {len(data):>11} {j * 1000:>9.1f}ms {m * 1000:>9.1f}ms {m / j:>5.1f}x")


if __name__ == "__main__":
    main()
