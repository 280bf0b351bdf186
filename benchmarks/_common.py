"""Helpers shared by the benchmark scripts (not part of mlfs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np


def make_model(d: Path, size: int) -> None:
    """A safetensors checkpoint shaped like an LLM's: 32 MiB fp16 matrices plus small fp32 norms."""
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tensors, total, i = {}, 0, 0
    while total < size:
        tensors[f"layers.{i:03d}.mlp.weight"] = rng.integers(0, 2**16, (4096, 4096), dtype=np.uint16).view(np.float16)
        tensors[f"layers.{i:03d}.norm.weight"] = rng.standard_normal(4096).astype(np.float32)
        total += 4096 * 4096 * 2 + 4096 * 4
        i += 1
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"layers": i}))


def drop_caches() -> bool:
    """Drop the page cache (root only); False if not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")
