"""Wiring a mount: manifest → tree, store → cache → chunk source → Operations → pyfuse3 main loop.

``serve`` runs in the foreground process; ``daemonize`` forks it into a daemon and returns once
the mount is ready (or reports the error the daemon hit before readiness).  Readiness means: the
manifest's prefetch files (and the header chunk of every file whose tensors it knows) are in the
cache, and the kernel mount is up.  SIGTERM, SIGINT and SIGHUP unmount cleanly.

Nothing but a signal or an unmount ends a mount: every task beside the FUSE loop runs under a
:class:`~mlfs.supervise.Supervisor` that logs, counts and restarts it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from . import config
from .cache import ChunkCache
from .client import clean_runtime_dir, control_socket_path
from .errors import MlfsError, MountError, StoreUnavailable
from .fetch import ChunkSource
from .fs import Operations
from .manifest import Manifest, match_prefetch
from .stores import Store
from .supervise import Supervisor
from .tree import Inodes, Tree

log = logging.getLogger("mlfs.mount")

#: Kernel read-ahead for the mount (KiB) and FUSE's async request window; both are best-effort
#: (root only) and make sequential and mmap reads stream instead of crawling 128 KiB at a time.
READ_AHEAD_KB = 1024
MAX_BACKGROUND = 64


@dataclass
class MountOptions:
    cache_dir: Path
    cache_size: int
    allow_other: bool = False
    prefetch_all: bool = False
    watch: str | None = None  # manifest file to watch for replacement
    switch_warm: bool = False  # a watched manifest's switch: fetch everything before the flip
    switch_check: bool = True  # ... or check the store holds it, flip, fetch (docs/adr/0019)
    catalog_poll: float = config.DEFAULT_CATALOG_POLL
    digest: str | None = None
    memory_bytes: int = field(default_factory=lambda: config.parse_size(config.DEFAULT_MEMORY))
    timeout: float = config.DEFAULT_READ_TIMEOUT
    read_ahead_kb: int = READ_AHEAD_KB
    allow_model_change: bool = False
    on_switch: str | None = None  # shell command run after every switch
    metrics_file: str | None = None  # Prometheus text kept current here
    metrics_interval: float = 5.0
    debug: bool = False


def fuse_problem(allow_other: bool) -> str | None:
    """Why a FUSE mount by this user cannot work, if a reason can be seen before trying."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (load the fuse module; in a container: --device /dev/fuse)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return ("no permission to open /dev/fuse (run as root, or give this user read/write "
                "access to it)")
    if os.geteuid() != 0:
        if shutil.which("fusermount3") is None:
            return "fusermount3 is not installed (Debian: apt-get install fuse3)"
        if allow_other and not _user_allow_other():
            return ("--allow-other needs 'user_allow_other' in /etc/fuse.conf when not mounting "
                    "as root")
    return None


def _user_allow_other(path: str = "/etc/fuse.conf") -> bool:
    try:
        with open(path) as f:
            return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def check_mountpoint(mountpoint: str) -> None:
    if not os.path.isdir(mountpoint):
        raise MountError(f"mount point {mountpoint} does not exist or is not a directory")
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point (mlfs umount {mountpoint} first)")


def prefetch_set(manifest: Manifest) -> list[tuple[str, int, str]]:
    """Chunks to cache before the mount is ready: prefetch patterns + the first chunk (the header)
    of every file with a tensor table (safetensors, GGUF, PyTorch zip)."""
    out: dict[str, tuple[str, int, str]] = {}
    for f in manifest.files:
        if match_prefetch(manifest.prefetch, f.path):
            for cid, size in zip(f.chunk_ids, f.chunk_sizes):
                out[cid] = (cid, size, f.path)
        elif f.tensors is not None and f.chunk_ids:
            out[f.chunk_ids[0]] = (f.chunk_ids[0], f.chunk_sizes[0], f.path)
    return list(out.values())


#: malloc arenas (heaps) the daemon's threads share; see _reuse_freed_memory.
MALLOC_ARENAS = 2


def _reuse_freed_memory() -> None:
    """Let malloc hand freed chunk buffers out again instead of mapping fresh memory each time.

    glibc serves blocks above its mmap threshold with a new mapping, and every 4 KiB page of a new
    mapping is a page fault and a zeroed page: measured here, 0.3 s of kernel CPU per GiB of chunks
    loaded (docs/adr/0008).  A fixed threshold above the largest chunk (64 MiB) keeps chunk buffers in
    malloc's heaps, and a 128 MiB trim threshold stops the heap from being handed back and faulted
    in again between chunks.

    Every heap keeps up to that much freed, though, and glibc gives threads heaps (arenas) of
    their own, up to 8 per core: a ``--memory 64M`` mount loading a model ten times its cache
    peaked at ~300 MiB RSS.  Two arenas (unless ``MALLOC_ARENA_MAX`` says otherwise) measured
    ~180 MiB (docs/adr/0018).  No-op where mallopt is missing (not glibc).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return
    mallopt(-3, config.MAX_CHUNK_SIZE)  # M_MMAP_THRESHOLD
    mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD
    if "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(-8, MALLOC_ARENAS)  # M_ARENA_MAX


def _tune_kernel(mountpoint: str, read_ahead_kb: int) -> dict:
    """Raise the bdi read-ahead and FUSE's background request limit for this mount (root only)."""
    done = {}
    try:
        st = os.stat(mountpoint)
        major, minor = os.major(st.st_dev), os.minor(st.st_dev)
        conn = "/sys/fs/fuse/connections"
        if os.path.isdir(conn) and not os.listdir(conn):  # fusectl not mounted yet
            subprocess.run(["mount", "-t", "fusectl", "none", conn], capture_output=True)
        for path, value, key in (
                (f"/sys/class/bdi/{major}:{minor}/read_ahead_kb", read_ahead_kb, "read_ahead_kb"),
                (f"/sys/fs/fuse/connections/{minor}/max_background", MAX_BACKGROUND, "max_background"),
                (f"/sys/fs/fuse/connections/{minor}/congestion_threshold", MAX_BACKGROUND * 3 // 4,
                 "congestion_threshold")):
            try:
                with open(path, "w") as f:
                    f.write(str(value))
                done[key] = value
            except OSError as e:
                log.info("cannot set %s: %s", path, e.strerror)
    except OSError as e:
        log.info("kernel tuning skipped: %s", e)
    return done


def serve(manifest: Manifest | None, store: Store | None, mountpoint: str, opts: MountOptions,
          ready=None) -> None:
    """Mount and serve until unmounted or signalled.  *ready(error_or_None)* is called once.

    With a manifest, serve that version (switchable); with ``manifest=None``, serve the whole store
    as a catalog ``<id>/<version|alias>/...``, polled every ``opts.catalog_poll`` seconds.
    ``ready`` gets ``None``, or a warning string when the mount is up but degraded (the store did
    not answer), or the exception that stopped it before readiness.
    """
    from .switch import CatalogView, Switcher

    mountpoint = os.path.abspath(mountpoint)
    check_mountpoint(mountpoint)
    problem = fuse_problem(opts.allow_other)
    if problem:
        raise MountError(f"cannot mount {mountpoint}: {problem}")
    _reuse_freed_memory()
    stale = clean_runtime_dir()
    if stale:
        log.info("removed %d files left by dead processes: %s", len(stale), ", ".join(stale))
    warning = None
    if store is not None:
        try:
            store.check_once()  # a missing bucket/directory: a clear error now, not EIO later
        except StoreUnavailable as e:  # down for now; a missing store or refused access raise
            warning = f"{e}; serving from the cache until it answers"
            log.warning("%s", warning)
    if manifest is not None and opts.digest and manifest.digest != opts.digest:
        raise MountError(f"{manifest.ref} has digest {manifest.digest}, not the pinned {opts.digest}")
    cache = ChunkCache(opts.cache_dir, opts.cache_size)
    source = ChunkSource(store, cache, memory_bytes=opts.memory_bytes, timeout=opts.timeout)
    inodes = Inodes()
    catalog = None
    if manifest is not None:
        tree = Tree.of(manifest, inodes)
        fsname = f"mlfs:{manifest.id}@{manifest.version}"
    else:
        catalog = CatalogView(store)
        try:
            files = catalog.refresh()[0]
        except MlfsError as e:
            files = []
            warning = (f"the catalog is empty: {e}; it fills when the store answers "
                       f"(polled every {opts.catalog_poll:g}s)")
            log.warning("%s", warning)
        tree = Tree(files, inodes, time.time_ns())
        fsname = "mlfs:catalog"
    sock = control_socket_path()
    info = {"mountpoint": mountpoint, "store": store.describe() if store else None,
            "cache_dir": str(opts.cache_dir), "cache_size": opts.cache_size, "pid": os.getpid(),
            "control": sock, "watching": opts.watch, "previous": None, "last_switch": None}
    supervisor = Supervisor()
    ops = Operations(tree, source, info, inodes=inodes, supervisor=supervisor, push=True)
    switcher = Switcher(ops, source, inodes)
    if opts.on_switch:
        hook = SwitchHook(opts.on_switch, mountpoint, info, supervisor)
        switcher.on_switch = hook

    # Before the kernel mount: the prefetch set must be cached (a store that is down or a chunk
    # that is missing fails the mount here, with a clear error, not the first read later).
    if manifest is not None:
        trio.run(source.warm, prefetch_set(manifest))

    options = set(pyfuse3.default_options)
    options |= {f"fsname={fsname}", "subtype=mlfs", "ro", "nosuid", "nodev"}
    if opts.allow_other:
        options.add("allow_other")
    if opts.debug:
        options.add("debug")
    try:
        pyfuse3.init(ops, mountpoint, options)
    except RuntimeError as e:
        why = fuse_problem(opts.allow_other) or f"{e} (the lines above, from libfuse, say why)"
        raise MountError(f"cannot mount {mountpoint}: {why}") from None

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            supervisor.nursery = nursery
            nursery.start_soon(_signals, nursery)
            nursery.start_soon(_fuse_loop, nursery)
            supervisor.start("control socket", lambda: switcher.serve_control(
                sock, digest=opts.digest, record=supervisor.record), restart=True)
            if opts.watch:
                supervisor.start("manifest watch", lambda: switcher.watch_file(
                    opts.watch, warm=opts.switch_warm, check=opts.switch_check, digest=opts.digest,
                    allow_model_change=opts.allow_model_change), restart=True)
            if catalog is not None:
                supervisor.start("catalog poll", lambda: switcher.poll_catalog(
                    store, opts.catalog_poll), restart=True)
            info["kernel"] = await trio.to_thread.run_sync(_tune_kernel, mountpoint,
                                                          opts.read_ahead_kb)
            if ready:
                ready(warning)
            if opts.prefetch_all and manifest is not None:
                supervisor.start("prefetch all", lambda: _warm_all(source, manifest))
            if opts.metrics_file:
                supervisor.start("metrics file", lambda: _keep_metrics(
                    ops, opts.metrics_file, opts.metrics_interval), restart=True)

    async def _fuse_loop(nursery: trio.Nursery) -> None:
        await pyfuse3.main()
        nursery.cancel_scope.cancel()  # unmounted from outside: stop background work too

    async def _signals(nursery: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for sig in sigs:
                log.info("signal %s: unmounting", sig)
                pyfuse3.terminate()
                nursery.cancel_scope.cancel()
                return

    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=True)
        source.flush()


class SwitchHook:
    """``--on-switch CMD``: run after every flip, in the background (the switch does not wait),
    with the versions in its environment; exit status logged and counted in ``mlfs stats``."""

    def __init__(self, command: str, mountpoint: str, info: dict, supervisor: Supervisor,
                 timeout: float = 300.0) -> None:
        self.command = command
        self.mountpoint = mountpoint
        self.info = info
        self.supervisor = supervisor
        self.timeout = timeout
        info.update(on_switch_runs=0, on_switch_failures=0, last_on_switch=None)

    def __call__(self, result: dict) -> None:
        self.supervisor.start("--on-switch", lambda: self._run(result))

    async def _run(self, result: dict) -> None:
        import json

        env = {**os.environ, "MLFS_SWITCH_FROM": result["from"], "MLFS_SWITCH_TO": result["to"],
               "MLFS_SWITCH_CHANGES": result.get("changes", ""),
               "MLFS_MOUNTPOINT": self.mountpoint, "MLFS_SWITCH_JSON": json.dumps(result)}
        t = time.monotonic()
        status: int | str
        with trio.move_on_after(self.timeout) as scope:
            proc = await trio.run_process(["/bin/sh", "-c", self.command], env=env, check=False,
                                          stdin=subprocess.DEVNULL, capture_stdout=True,
                                          capture_stderr=True)
            status = proc.returncode
        if scope.cancelled_caught:
            status = f"killed after {self.timeout:.0f}s"
        self.info["on_switch_runs"] += 1
        if status != 0:
            self.info["on_switch_failures"] += 1
            tail = (proc.stderr or b"").decode(errors="replace").strip().splitlines()[-3:] \
                if not scope.cancelled_caught else []
            log.error("--on-switch after %s -> %s: exit %s%s", result["from"], result["to"], status,
                      f" ({' | '.join(tail)})" if tail else "")
        else:
            log.info("--on-switch after %s -> %s: exit 0 in %.2fs", result["from"], result["to"],
                     time.monotonic() - t)
        self.info["last_on_switch"] = {"from": result["from"], "to": result["to"],
                                       "status": status, "seconds": round(time.monotonic() - t, 3)}


async def _keep_metrics(ops: Operations, path: str, interval: float) -> None:
    from .client import prometheus, write_atomic

    while True:
        text = prometheus(ops.stats()).encode()
        await trio.to_thread.run_sync(write_atomic, path, text)
        await trio.sleep(interval)


async def _warm_all(source: ChunkSource, manifest: Manifest) -> None:
    chunks: dict[str, tuple[str, int, str]] = {}
    for f in manifest.files:
        for cid, size in zip(f.chunk_ids, f.chunk_sizes):
            chunks.setdefault(cid, (cid, size, f.path))
    try:
        await source.warm(list(chunks.values()), background=True)
        log.info("prefetch all: done")
    except MlfsError as e:
        log.warning("prefetch all: %s", e)


# -- daemon mode ---------------------------------------------------------------------------------
def daemonize(run, log_file: Path, timeout: float = 300) -> tuple[int, str | None]:
    """Fork a daemon that calls ``run(ready_fd)``; return its pid and warning once it is ready.

    The child starts a session of its own, writes its output to *log_file*, and reports on the
    pipe ``ready``, ``ready: <warning>`` or ``error: <message>``; the parent raises MountError for
    an error or a child that exits without a word.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the daemon
        code = 1
        try:
            os.close(r)
            os.setsid()
            out = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            run(w)
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported on the pipe, then exit
            try:
                os.write(w, f"error: {e}".encode())
            except OSError:
                pass
            if not isinstance(e, MlfsError):
                import traceback

                traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    msg = b""
    deadline = time.monotonic() + timeout
    with os.fdopen(r, "rb") as pipe:
        while time.monotonic() < deadline:
            chunk = pipe.read(4096)
            if not chunk:
                break
            msg += chunk
    text = msg.decode(errors="replace").strip()
    if text == "ready":
        return pid, None
    if text.startswith("ready: "):
        return pid, text.removeprefix("ready: ")
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    raise MountError(text.removeprefix("error: ") or f"mount process exited; see {log_file}")
