"""Stored bytes and object counts of one model family under several chunking strategies.

    python benchmarks/dedup.py [FAMILY_DIR] [--format safetensors|gguf|torch|all]

FAMILY_DIR holds one model directory per version (default: builds the MiniLM family of
examples/model_family.py into a temp dir, in each format asked for: safetensors as shipped, GGUF
written by gguf-py — plus "meta", v1 with one more metadata field — and ``torch.save``
checkpoints).  Every strategy sees the same files; "stored" is the sum of the distinct chunks,
"objects" their count (each one a store request on a cold read).  "mlfs default, chunks
compressed" is what mlfs stores for its chunks (docs/adr/0022), against the rows' uncompressed bytes.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import blake3

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlfs import chunking  # noqa: E402
from mlfs.chunking import HeaderError  # noqa: E402
from mlfs import codec  # noqa: E402
from mlfs.generate import plan_spans, scan_model_dir  # noqa: E402

MiB = 1 << 20


def tensor_spans(data: bytes, size: int, *, piece: int, small: int, policy: str, pack_limit: int):
    n = chunking.header_length(data[:8], size)
    start, tensors = chunking.parse_safetensors_header(data[:8 + n], size)
    return chunking.safetensors_spans(start, tensors, size, piece=piece, small=small, policy=policy,
                                      pack_limit=pack_limit)


def strategies(fmt: str = "safetensors"):
    yield "whole file", lambda rel, data, size: [(0, size)] if size else []
    if fmt != "safetensors":
        yield "fixed 4 MiB offsets (mlfs before)", \
            lambda rel, data, size: chunking.fixed_spans(0, size, 4 * MiB)
    yield "fixed 16 MiB offsets", lambda rel, data, size: chunking.fixed_spans(0, size, 16 * MiB)
    try:
        import pyfastcdc

        for avg in (16384, 65536):
            def cdc(rel, data, size, avg=avg):
                if not size:
                    return []
                return [(c.offset, c.offset + c.length)
                        for c in pyfastcdc.FastCDC(avg_size=avg).cut_buf(data)]
            yield f"{avg >> 10} KiB CDC (FastCDC)", cdc
    except ImportError:
        print("pyfastcdc not installed: skipping the CDC row", file=sys.stderr)

    def per_tensor(rel, data, size):
        if rel.endswith(".safetensors"):
            try:
                return tensor_spans(data, size, piece=1 << 62, small=0, policy="separate",
                                    pack_limit=0)
            except HeaderError:
                pass
        return chunking.fixed_spans(0, size, MiB)
    if fmt != "safetensors":
        yield "mlfs default", lambda rel, data, size: plan_spans(rel, data, size)[0]
        return
    yield "one chunk per tensor", per_tensor

    for piece in (256 << 10, MiB, 4 * MiB, 8 * MiB, 16 * MiB):
        for policy in ("separate", "pack", "glue"):
            def f(rel, data, size, piece=piece, policy=policy):
                if rel.endswith(".safetensors"):
                    try:
                        return tensor_spans(data, size, piece=piece, small=64 << 10,
                                            policy=policy, pack_limit=MiB)
                    except HeaderError:
                        pass
                return chunking.fixed_spans(0, size, piece)
            yield f"tensor-aligned {piece >> 10} KiB, small:{policy}", f
    yield "mlfs default", lambda rel, data, size: plan_spans(rel, data, size)[0]


def measure(dirs: list[Path], fmt: str = "safetensors"):
    files = []
    for d in dirs:
        for rel, full, size, _ in scan_model_dir(d):
            files.append((rel, full.read_bytes(), size))
    logical = sum(s for _, _, s in files)
    rows = []
    for name, fn in strategies(fmt):
        chunks: dict[bytes, int] = {}
        framed: dict[bytes, int] = {}  # what mlfs stores for the chunk (docs/adr/0022)
        for rel, data, size in files:
            for a, b in fn(rel, data, size):
                key = blake3.blake3(data[a:b]).digest()
                chunks[key] = b - a
                if name == "mlfs default" and key not in framed:
                    frame = codec.encode(data[a:b])
                    framed[key] = b - a if frame is None else len(frame)
        stored = sum(chunks.values())
        rows.append((name, stored, len(chunks)))
        if framed:
            rows.append(("mlfs default, chunks compressed", sum(framed.values()), len(framed)))
    return logical, rows


def build_family(fmt: str, scratch: list[Path]) -> Path:
    """The MiniLM family in *fmt*, in new temp dirs (added to *scratch* for the caller to remove)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import model_family

    family = Path(tempfile.mkdtemp(prefix=f"mlfs-family-{fmt}-"))
    src = Path(tempfile.mkdtemp(prefix="mlfs-family-src-")) if fmt != "safetensors" else family
    scratch += [family, src]
    for v in model_family.VARIANTS:
        model_family.write_variant(model_family.base_model_dir(), src / v, v)
    if fmt == "gguf":
        for v in model_family.VARIANTS:
            model_family.write_gguf(src / v, family / v / "model.gguf")
        model_family.write_gguf(src / "v1", family / "meta" / "model.gguf",
                                description="same weights, one more metadata field")
    elif fmt == "torch":
        for v in model_family.VARIANTS:
            model_family.write_torch(src / v, family / v / "pytorch_model.bin")
    return family


def report(family: Path, fmt: str) -> None:
    dirs = sorted(p for p in family.iterdir() if p.is_dir())
    logical, rows = measure(dirs, fmt)
    best = min(s for n, s, _ in rows if "compressed" not in n)  # the best chunking, as stored
    cdc_objects = next((o for n, _, o in rows if n.startswith("64 KiB CDC")), None)
    print(f"\n[{fmt}] family: {', '.join(d.name for d in dirs)}; logical {logical / MiB:.1f} MiB")
    print(f"{'strategy':<38} {'stored MiB':>10} {'dedup':>7} {'vs best':>8} {'objects':>8} "
          f"{'vs 64K CDC':>10}")
    for name, stored, objects in rows:
        vs_cdc = f"{objects / cdc_objects:.2f}x" if cdc_objects else "-"
        print(f"{name:<38} {stored / MiB:>10.1f} {1 - stored / logical:>7.1%} "
              f"{stored / best:>7.3f}x {objects:>8} {vs_cdc:>10}")


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("family", nargs="?", type=Path)
    ap.add_argument("--format", default="all", choices=["safetensors", "gguf", "torch", "all"])
    args = ap.parse_args()
    formats = ["safetensors", "gguf", "torch"] if args.format == "all" else [args.format]
    for fmt in formats:
        if args.family:
            report(args.family, fmt)
            continue
        scratch: list[Path] = []
        try:
            report(build_family(fmt, scratch), fmt)
        finally:  # ~0.6-1.2 GB per format
            for d in scratch:
                shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
