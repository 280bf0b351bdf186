"""The client side of a running mount: ``mlfs stats``, ``mlfs switch``, ``mlfs umount``.

These commands talk to a mount process and must start fast, so this module imports neither pyfuse3
nor trio.  A mount answers on two channels:

- the ``user.mlfs.stats`` extended attribute of its root: its counters as JSON (docs/adr/0003);
- a Unix socket in :func:`mlfs.config.runtime_dir` named ``mount-<pid>.sock``: one JSON request line
  in, one JSON reply line out (``{"op": "switch", "path": ..., "warm": ..., "digest": ...,
  "allow_model_change": ...}``).

Both directions are untrusted: the mount bounds and validates what it reads, and this side treats a
reply it cannot parse as an error.  Files a dead process left in the runtime directory (its socket,
a temporary manifest of an interrupted ``mlfs switch``) are removed by :func:`clean_runtime_dir`
when the next mount starts.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from typing import Iterator

from . import config
from .errors import MlfsError, MountError

STATS_XATTR = b"user.mlfs.stats"
#: Largest request or reply line on the control socket.
MAX_LINE = 1 << 20

_OWNED = re.compile(r"(?:mount-(\d+)\.sock|switch-(\d+)-[^/]*\.json)")


def control_socket_path(pid: int | None = None) -> str:
    d = config.runtime_dir()
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return str(d / f"mount-{pid or os.getpid()}.sock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_runtime_dir() -> list[str]:
    """Remove sockets and temporary manifests whose process is gone; return their names."""
    d = config.runtime_dir()
    removed = []
    try:
        names = os.listdir(d)
    except OSError:
        return removed
    for name in names:
        m = _OWNED.fullmatch(name)
        if m is None:
            continue
        pid = int(m.group(1) or m.group(2))
        if pid != os.getpid() and not _alive(pid):
            try:
                os.unlink(d / name)
                removed.append(name)
            except OSError:
                pass
    return removed


@contextmanager
def temp_manifest(data: bytes) -> Iterator[str]:
    """A manifest written where the mount can read it, named after this process so that a
    ``kill -9`` leaves a file the next mount recognises as stale."""
    d = config.runtime_dir()
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=f"switch-{os.getpid()}-", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield path
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def read_stats(mountpoint: str) -> dict:
    try:
        raw = os.getxattr(mountpoint, STATS_XATTR.decode())
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, getattr(errno, "ENOATTR", errno.ENODATA)):
            raise MlfsError(f"{mountpoint} is not an mlfs mount") from None
        raise MlfsError(f"cannot read stats of {mountpoint}: {e.strerror}") from None
    try:
        stats = json.loads(raw)
    except ValueError:
        stats = None
    if not isinstance(stats, dict):
        raise MlfsError(f"{mountpoint} answered stats that are not a JSON object")
    return stats


def request_switch(sock_path: str, manifest_path: str, *, warm: bool = False, check: bool = True,
                   digest: str | None = None, allow_model_change: bool = False,
                   timeout: float = 3600) -> dict:
    """Ask a mount to switch; returns the switch figures or raises MlfsError."""
    req = {"op": "switch", "path": os.path.abspath(manifest_path), "warm": warm, "check": check,
           "digest": digest,
           "allow_model_change": allow_model_change}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(sock_path)
        except OSError as e:
            raise MlfsError(f"cannot reach the mount's control socket {sock_path}: "
                            f"{e.strerror}") from None
        try:
            s.sendall(json.dumps(req).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n") and len(data) <= MAX_LINE:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as e:
            raise MlfsError(f"control connection to the mount failed: {e.strerror or e}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise MlfsError("the mount closed the control connection without an answer")
    if not reply.get("ok"):
        raise MlfsError(f"switch refused, mount stays on its version: {reply.get('error')}")
    result = reply.get("switch")
    if not isinstance(result, dict):
        raise MlfsError("the mount answered the switch without its figures")
    return result


def unmount(mountpoint: str, lazy: bool = False) -> None:
    """Unmount; a mount whose process died (ENOTCONN) is detached lazily even if files are open."""
    def run(lazy_flag: bool) -> subprocess.CompletedProcess:
        cmd = ["fusermount3", "-u", *(["-z"] if lazy_flag else []), mountpoint]
        try:
            return subprocess.run(cmd, capture_output=True, text=True)
        except FileNotFoundError:
            return subprocess.run(["umount", *(["-l"] if lazy_flag else []), mountpoint],
                                  capture_output=True, text=True)

    p = run(lazy)
    if p.returncode != 0 and not lazy and is_dead(mountpoint):
        p = run(True)
    if p.returncode != 0:
        err = (p.stderr or p.stdout).strip().splitlines()
        raise MountError(f"cannot unmount {mountpoint}: {err[-1] if err else 'failed'}")


def is_dead(mountpoint: str) -> bool:
    try:
        os.statvfs(mountpoint)  # statfs always reaches the daemon; stat may be answered from cache
    except OSError as e:
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


#: Stats that are counters (only ever grow); every other number is a gauge.
_COUNTERS = {"bytes_served", "bytes_fetched", "received_bytes", "chunks_fetched", "memory_hits",
             "disk_hits",
             "cache_misses", "fetch_errors", "corrupt_chunks", "corrupt_cache_files",
             "uncached_chunks", "cache_write_errors", "retries", "prefetched_bytes",
             "background_errors", "on_switch_runs", "on_switch_failures", "switches",
             "streamed_bytes", "pushed_bytes", "push_seconds", "loads_recognised", "part_reads"}


def prometheus(stats: dict) -> str:
    """A mount's stats as Prometheus text (``mlfs stats --prometheus``, ``--metrics-file``): every
    number, plus hit ratios and the last switch's latency, labelled with mount point and model."""
    def esc(v: object) -> str:
        return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")

    labels = f'mountpoint="{esc(stats.get("mountpoint", ""))}",id="{esc(stats.get("id") or "")}",' \
             f'version="{esc(stats.get("version") or "")}"'
    out = []

    def emit(name: str, value: float, kind: str) -> None:
        out.append(f"# TYPE mlfs_{name} {kind}")
        out.append(f"mlfs_{name}{{{labels}}} {value}")

    for key, value in sorted(stats.items()):
        if type(value) in (int, float):
            emit(f"{key}_total" if key in _COUNTERS else key, value,
                 "counter" if key in _COUNTERS else "gauge")
    loads = sum(stats.get(k, 0) for k in ("memory_hits", "disk_hits", "cache_misses"))
    if loads:
        emit("memory_hit_ratio", round(stats.get("memory_hits", 0) / loads, 6), "gauge")
        emit("disk_hit_ratio", round(stats.get("disk_hits", 0) / loads, 6), "gauge")
        emit("miss_ratio", round(stats.get("cache_misses", 0) / loads, 6), "gauge")
    last = stats.get("last_switch")
    if isinstance(last, dict):
        for key in ("total_seconds", "warm_seconds", "flip_seconds", "bytes_fetched"):
            if type(last.get(key)) in (int, float):
                emit(f"last_switch_{key}", last[key], "gauge")
    return "\n".join(out) + "\n"


def write_atomic(path: str, data: bytes, mode: int | None = None) -> None:
    """Replace *path* with *data* in one rename (readers never see half a file); no temp file is
    left behind on failure.  *mode* sets the new file's permission bits."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
