"""Helpers shared by the benchmark scripts (not part of mlfs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np


def llm_tensors(size: int, rows: int = 4096, cols: int = 4096) -> tuple[dict, int]:
    """LLM-shaped tensors of about *size* bytes: ``rows x cols`` fp16 matrices, each followed by
    a small fp32 norm; and the number of layers."""
    rng = np.random.default_rng(0)
    tensors, total, i = {}, 0, 0
    while total < size:
        tensors[f"layers.{i:03d}.mlp.weight"] = rng.integers(0, 2**16, (rows, cols), dtype=np.uint16).view(np.float16)
        tensors[f"layers.{i:03d}.norm.weight"] = rng.standard_normal(cols).astype(np.float32)
        total += rows * cols * 2 + cols * 4
        i += 1
    return tensors, i


def make_model(d: Path, size: int) -> None:
    """A safetensors checkpoint shaped like an LLM's: 32 MiB fp16 matrices plus small fp32 norms."""
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    tensors, layers = llm_tensors(size)
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"layers": layers}))


def vm_state() -> dict[str, str]:
    """What this VM did with memory and idle CPUs while a run was measured: on this machine, free
    page reporting (the balloon hands freed 2 MiB blocks back to the host, and touching them again
    costs a host fault each) moved a 555 MiB read from 0.40-0.47 s to 1.0-1.5 s (docs/adr/0038)."""
    state = {}
    for name, path in (("page_reporting_order",
                        "/sys/module/page_reporting/parameters/page_reporting_order"),
                       ("cpuidle", "/sys/devices/system/cpu/cpuidle/current_driver"),
                       ("guest_halt_poll_ns", "/sys/module/haltpoll/parameters/guest_halt_poll_ns")):
        try:
            state[name] = Path(path).read_text().strip()
        except OSError:
            state[name] = "unknown"
    return state


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


class ShapedLink:
    """A network namespace reached over a veth pair shaped with ``tc tbf`` in both directions
    (netem is absent here; tbf's queue adds the latency of a full buffer).  Root only."""

    def __init__(self, name: str, mbit: int, *, burst: str = "1mb", latency: str = "50ms",
                 subnet: str = "10.77.0") -> None:
        self.ns, self.vo, self.vh = name, f"{name[:8]}-o", f"{name[:8]}-h"
        self.origin_ip, self.host_ip = f"{subnet}.1", f"{subnet}.2"
        self.mbit, self.burst, self.latency = mbit, burst, latency

    def sh(self, *cmd: str, ns: bool = False, check: bool = True) -> subprocess.CompletedProcess:
        full = ["ip", "netns", "exec", self.ns, *cmd] if ns else list(cmd)
        return subprocess.run(full, check=check, capture_output=True, text=True)

    def up(self) -> "ShapedLink":
        self.down()
        self.sh("ip", "netns", "add", self.ns)
        self.sh("ip", "link", "add", self.vh, "type", "veth", "peer", "name", self.vo)
        self.sh("ip", "link", "set", self.vo, "netns", self.ns)
        self.sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.vh)
        self.sh("ip", "link", "set", self.vh, "up")
        self.sh("ip", "addr", "add", f"{self.origin_ip}/24", "dev", self.vo, ns=True)
        self.sh("ip", "link", "set", self.vo, "up", ns=True)
        self.sh("ip", "link", "set", "lo", "up", ns=True)
        self.shape(self.mbit)
        return self

    def shape(self, mbit: int) -> None:
        """(Re)set the rate of both directions."""
        self.mbit = mbit
        for dev, ns in ((self.vo, True), (self.vh, False)):
            self.sh("tc", "qdisc", "del", "dev", dev, "root", ns=ns, check=False)
            self.sh("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit",
                    "burst", self.burst, "latency", self.latency, ns=ns)

    def down(self) -> None:
        self.sh("ip", "netns", "del", self.ns, check=False)
        self.sh("ip", "link", "del", self.vh, check=False)

    def sent_bytes(self) -> int:
        """Bytes the namespace's side has sent across the link so far."""
        return int(self.sh("cat", f"/sys/class/net/{self.vo}/statistics/tx_bytes", ns=True).stdout)


def s3rver_env(**extra: str) -> dict[str, str]:
    """This process's environment for talking to s3rver: its fixed credentials, and without
    ``AWS_CA_BUNDLE`` (set here for https; Go tools then fail against plain http)."""
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    env.update(AWS_ACCESS_KEY_ID="S3RVER", AWS_SECRET_ACCESS_KEY="S3RVER",
               AWS_DEFAULT_REGION="us-east-1", **extra)
    return env


def s3rver_in(link: ShapedLink, s3rver: str, directory: Path, bucket: str = "bench",
              port: int = 4569) -> tuple[subprocess.Popen, str]:
    """s3rver keeping its buckets in *directory*, inside *link*'s namespace (its veth up), with
    *bucket* made; the process and its endpoint, once it answers."""
    server = subprocess.Popen(["ip", "netns", "exec", link.ns, s3rver, "--address", link.origin_ip,
                               "--port", str(port), "--directory", str(directory), "--silent",
                               "--configure-bucket", bucket],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://{link.origin_ip}:{port}"
    for _ in range(100):
        if subprocess.run(["curl", "-s", "-o", "/dev/null", endpoint]).returncode == 0:
            return server, endpoint
        if server.poll() is not None:
            break
        time.sleep(0.1)
    server.terminate()
    raise RuntimeError(f"s3rver did not answer at {endpoint}")
