"""Wiring a mount: manifest → tree, store → cache → chunk source → Operations → pyfuse3 main loop.

``serve`` runs in the daemon (or the foreground process).  Readiness means: the manifest's
prefetch files (and the header chunk of every file whose tensors it knows) are in the cache, and
the kernel mount is up.  As root, :mod:`mlfs.launch` gets there before this module is imported
and hands ``serve`` the kernel mount to serve (docs/adr/0021); otherwise ``serve`` does it all and
says when.  SIGTERM, SIGINT and SIGHUP unmount cleanly.

Nothing but a signal or an unmount ends a mount: every task beside the FUSE loop runs under a
:class:`~mlfs.supervise.Supervisor` that logs, counts and restarts it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

import pyfuse3
import trio

from . import buffers, dataplane, passthrough
from .cache import ChunkCache
from .client import clean_runtime_dir, control_socket_path
from .errors import MlfsError, MountError
from .fetch import ChunkSource
from .fs import Operations
from .launch import (EarlySignals, KernelMount, MountOptions, check_before_mount, fsname_of,
                     fuse_options, fuse_problem, prefetch_set, warm)
from .manifest import Manifest
from .stores import Store
from .supervise import Supervisor
from .tree import Inodes, Tree

log = logging.getLogger("mlfs.mount")

#: FUSE's async request window (best-effort, root only).
MAX_BACKGROUND = 64


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
          ready=None, *, kmount: KernelMount | None = None,
          early: EarlySignals | None = None) -> None:
    """Mount and serve until unmounted or signalled.  *ready(error_or_None)* is called once.

    With a manifest, serve that version (switchable); with ``manifest=None``, serve the whole store
    as a catalog ``<id>/<version|alias>/...``, polled every ``opts.catalog_poll`` seconds.
    ``ready`` gets ``None``, or a warning string when the mount is up but degraded (the store did
    not answer), or the exception that stopped it before readiness.

    With *kmount*, ``mlfs mount`` has made the kernel mount already and cached the prefetch set
    (:func:`mlfs.launch.prepare`): serve its ``/dev/fuse`` descriptor, and take the kernel mount
    down however this ends.  *early*: the signal handling installed before the imports.
    """
    early = early or EarlySignals()
    try:
        _serve(manifest, store, mountpoint, opts, ready, kmount, early)
    finally:
        if kmount is not None:  # failed before the FUSE loop: the mount must not outlive us
            kmount.unmount()


def _serve(manifest: Manifest | None, store: Store | None, mountpoint: str, opts: MountOptions,
           ready, kmount: KernelMount | None, early: EarlySignals) -> None:
    from .switch import CatalogView, Switcher, bind_control

    mountpoint = os.path.abspath(mountpoint)
    warning = None
    if kmount is None:  # else mlfs mount checked all this before it mounted
        warning = check_before_mount(manifest, store, mountpoint, opts)
        if warning:
            log.warning("%s", warning)
    buffers.reuse_freed_memory()
    stale = clean_runtime_dir()
    if stale:
        log.info("removed %d files left by dead processes: %s", len(stale), ", ".join(stale))
    cache = ChunkCache(opts.cache_dir, opts.cache_size)
    if kmount is not None:  # mlfs mount cached the prefetch set before it mounted (docs/adr/0021)
        fetched = kmount.fetched
    elif manifest is not None:
        # Before the kernel mount: the prefetch set must be cached (a store that is down or a
        # chunk that is missing fails the mount here, with a clear error, not the first read).
        fetched = warm(store, cache, prefetch_set(manifest), opts.timeout)
    else:
        fetched = (0, 0)
    source = ChunkSource(store, cache, memory_bytes=opts.memory_bytes, timeout=opts.timeout)
    source.counters.cache_misses += fetched[0]  # the stats count what was fetched before serving
    source.counters.chunks_fetched += fetched[0]
    source.counters.bytes_fetched += fetched[1]
    inodes = Inodes()
    catalog = None
    if manifest is not None:
        tree = Tree.of(manifest, inodes)
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

    # The control socket listens before the first FUSE request is answered: whoever learns its
    # path from the stats attribute can connect at once (its requests wait in the backlog).
    listeners = [bind_control(sock)]

    try:
        pyfuse3.init(ops, mountpoint if kmount is None else kmount.device_path,
                     fuse_options(fsname_of(manifest), opts.allow_other, opts.debug))
    except RuntimeError as e:
        why = fuse_problem(opts.allow_other) or f"{e} (the lines above, from libfuse, say why)"
        raise MountError(f"cannot mount {mountpoint}: {why}") from None
    ops.fuse_fd = dataplane.fuse_fd()  # pushes go straight to /dev/fuse where the C steps are built
    # Before the session reads INIT, whose reply must ask for passthrough (docs/adr/0035).
    ops.kernel = passthrough.Kernel(dataplane.session_fd(), want=opts.passthrough)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            supervisor.nursery = nursery
            nursery.start_soon(_signals, nursery)
            nursery.start_soon(_fuse_loop, nursery)
            supervisor.start("control socket", lambda: switcher.serve_control(
                sock, digest=opts.digest, record=supervisor.record,
                listener=listeners.pop() if listeners else None), restart=True)
            if opts.watch:
                supervisor.start("manifest watch", lambda: switcher.watch_file(
                    opts.watch, warm=opts.switch_warm, check=opts.switch_check, digest=opts.digest,
                    allow_model_change=opts.allow_model_change), restart=True)
            if catalog is not None:
                supervisor.start("catalog poll", lambda: switcher.poll_catalog(
                    store, opts.catalog_poll, catalog), restart=True)
            info["kernel"] = await trio.to_thread.run_sync(_tune_kernel, mountpoint,
                                                          opts.read_ahead_kb)
            if ready:
                ready(warning)
            supervisor.start("buffer prefault", lambda: trio.to_thread.run_sync(cache.prefault))
            if opts.prefetch_all and manifest is not None:
                supervisor.start("prefetch all", lambda: _warm_all(source, manifest))
            if opts.metrics_file:
                supervisor.start("metrics file", lambda: _keep_metrics(
                    ops, opts.metrics_file, opts.metrics_interval), restart=True)

    async def _fuse_loop(nursery: trio.Nursery) -> None:
        await pyfuse3.main()
        ops.ending()  # a whole copy being written gets a few seconds more (docs/adr/0035)
        nursery.cancel_scope.cancel()  # unmounted from outside: stop background work too

    async def _signals(nursery: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            if early.caught is None:
                async for sig in sigs:
                    early.caught = sig
                    break
            log.info("signal %s: unmounting", early.caught)
            ops.ending()
            pyfuse3.terminate()
            nursery.cancel_scope.cancel()

    early.unwind = False
    try:
        trio.run(main)
    finally:
        if kmount is not None:  # libfuse did not mount, so it will not unmount: do it first
            kmount.unmount()
        pyfuse3.close(unmount=kmount is None)
        source.flush()
        try:
            ops.finish_wholes()
        except Exception:  # noqa: BLE001 - the mount is gone already; say why, exit as usual
            log.exception("whole copies at unmount: internal error")


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
