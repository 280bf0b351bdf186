"""Switching a live mount to another version, and keeping a catalog mount up to date.

The semantics (docs/adr/0006-switch.md):

- checked, then flipped, then filled (the default, docs/adr/0019): the store is asked whether every
  chunk of the new version that the host does not hold is there (one HEAD each, in parallel); if one
  is missing or the store does not answer, the mount stays on its version.  Then the flip, and the
  missing chunks are fetched in the background, reads first, so a loader started right after the
  switch overlaps its own start with the fetch.  What this does not catch: a chunk that is there but
  corrupt, or a store that fails after the check.  Reads of those chunks then fail;
- ``warm=True`` fetches (and verifies) every missing chunk before the flip, as every switch did
  before: the new version is on the host before anyone sees it, at the price of the fetch and the
  load one after the other;
- ``check=False`` (with ``warm=False``) flips at once, without asking the store;
- the flip is one assignment of ``ops.tree`` in the trio thread: lookups and opens after it see the
  new version; a handle opened before it keeps its ``FileEntry`` and reads the old version to the end;
- unchanged files keep their inode numbers (``tree.Inodes``) and so their kernel page cache; the
  kernel forgets the dentries of changed and removed files (``invalidate_entry``).

Triggers: ``mlfs switch`` over the mount's control socket, a watched manifest file
(``mlfs mount --manifest FILE``), and, for a catalog mount, polling the store.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import replace
from typing import Callable

import trio

from . import manifest as mf
from . import passthrough
from .client import MAX_LINE
from .errors import ManifestError, MlfsError, StoreError
from .fetch import ChunkSource
from .fs import Operations
from .stores import Store
from .tree import Inodes, Tree

log = logging.getLogger("mlfs.switch")

#: HEAD requests in flight while a switch checks that the store holds what it will fetch.
CONFIRM_CONCURRENCY = 16


def _kernel_invalidate(parent: int, name: bytes) -> None:
    import pyfuse3

    pyfuse3.invalidate_entry(parent, name)


def bind_control(sock_path: str) -> socket.socket:
    """A listening Unix socket at *sock_path* (replacing a stale one), readable by its owner only."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            os.unlink(sock_path)
        except FileNotFoundError:
            pass
        sock.bind(sock_path)
        os.chmod(sock_path, 0o600)
        sock.listen(8)
    except BaseException:
        sock.close()
        raise
    return sock


class Switcher:
    """Flips an :class:`Operations` to other trees.  ``invalidate(parent inode, name)`` tells the
    kernel to forget an entry (``pyfuse3.invalidate_entry``; the in-process tests pass a recorder)."""

    def __init__(self, ops: Operations, source: ChunkSource, inodes: Inodes, *,
                 invalidate: Callable[[int, bytes], None] = _kernel_invalidate) -> None:
        self.ops = ops
        self.source = source
        self.inodes = inodes
        self.invalidate = invalidate
        #: Called with the switch's figures after every flip (``--on-switch``); must not block.
        self.on_switch: Callable[[dict], None] | None = None
        self._lock = trio.Lock()  # one switch at a time

    def _missing(self, files: list[mf.FileEntry]) -> list[tuple[str, int, str]]:
        need: dict[str, tuple[str, int, str]] = {}
        cache = self.source.cache
        for f in files:
            for cid, size in zip(f.chunk_ids, f.chunk_sizes):
                if cid not in need and self.source.peek(cid) is None and not cache.contains(cid):
                    need[cid] = (cid, size, f.path)
        return list(need.values())

    async def _warm(self, files: list[mf.FileEntry]) -> None:
        await self.source.warm(self._missing(files))

    async def _confirm(self, files: list[mf.FileEntry]) -> int:
        """Raise StoreError unless the store holds every chunk of *files* the host lacks; return
        how many were asked about."""
        missing = self._missing(files)  # on the event loop: it peeks at the memory LRU
        if not missing:
            return 0
        store = self.source.store
        if store is None:
            cid, _, path = missing[0]
            raise StoreError(f"{path} needs chunk {cid[:16]}, which is not cached, and the mount "
                             "has no store")
        absent: list[tuple[str, int, str]] = []
        errors: list[MlfsError] = []
        limiter = trio.CapacityLimiter(CONFIRM_CONCURRENCY)

        async def one(item: tuple[str, int, str]) -> None:
            async with limiter:
                try:
                    if not await trio.to_thread.run_sync(store.has_chunk, item[0]):
                        absent.append(item)
                except MlfsError as e:  # collected: one error, not a group of them, reaches the caller
                    errors.append(e)
        async with trio.open_nursery() as n:
            for item in missing:
                n.start_soon(one, item)
        if errors:
            raise StoreError(f"cannot check {store.describe()} for the new chunks: {errors[0]}")
        if absent:
            cid, _, path = absent[0]
            more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
            raise StoreError(f"{path} needs chunk {cid[:16]}, which is not in "
                             f"{store.describe()}{more}")
        return len(missing)

    async def _fill(self, files: list[mf.FileEntry], label: str,
                    wholes: list[mf.FileEntry]) -> None:
        """After a switch that did not warm: fetch what the new version lacks, as background
        work (reads jump its queue), then write the whole copies of *wholes*.  A chunk that
        cannot be had now is left to the read that needs it."""
        try:
            # On the event loop: _missing peeks at the memory LRU, which only this thread touches.
            await self.source.warm(self._missing(files), background=True)
            log.info("background fetch of %s: done", label)
        except MlfsError as e:
            log.warning("background fetch of %s: %s (reads will fetch what is missing)", label, e)
        self.ops.prepare_wholes(wholes)

    def _successors(self, old: Tree, new: Tree) -> list[mf.FileEntry]:
        """Files of *new* that replace, at their path, a file of *old* that has a whole copy:
        a file loaded whole before the switch is likely loaded whole after it, and gets its
        copy as soon as its chunks are here (docs/adr/0036)."""
        kernel = self.ops.kernel
        if kernel is None or not kernel.active:
            return []
        cache = self.source.cache
        before = {f.path: f.blake3 for f in old.files}
        return [f for f in new.files
                if f.size >= passthrough.MIN_SIZE and before.get(f.path, f.blake3) != f.blake3
                and cache.whole_file(before[f.path], touch=False) is not None
                and cache.whole_file(f.blake3, touch=False) is None]

    def _discard(self, new: Tree) -> None:
        """Give back the inode numbers a tree that was never served took."""
        for ino in new.nodes:
            if ino not in self.ops.tree.nodes and ino not in self.ops.retired:
                self.inodes.release(ino)

    async def switch(self, new: Tree, *, warm: bool = False, check: bool = True, label: str = "",
                     changes: str = "", fill: list[mf.FileEntry] | None = None) -> dict:
        """Check or warm (see the module's docstring), flip to *new*, invalidate what changed,
        fetch in the background what was not warmed (of *fill*, where given: a catalog fills
        only what a moved alias now shows); return the switch's figures."""
        async with self._lock:
            old = self.ops.tree
            t0 = time.monotonic()
            fetched0 = self.source.counters.bytes_fetched
            checked = 0
            wholes = self._successors(old, new)
            try:
                if warm:
                    await self._warm(new.files)
                elif check:
                    checked = await self._confirm(new.files)
            except BaseException:
                self._discard(new)
                raise
            t1 = time.monotonic()
            self.ops.flip(new)
            stale = new.stale_entries(old)
            for parent, name in stale:
                # Not from a request handler, so the synchronous call cannot deadlock, and the
                # switch is only reported complete once the kernel has forgotten the old entries.
                try:
                    await trio.to_thread.run_sync(self.invalidate, parent, os.fsencode(name))
                except OSError as e:  # ENOENT: the kernel never looked the name up
                    log.debug("invalidate %s in %d: %s", name, parent, e)
            t2 = time.monotonic()
            result = {"from": _label(old), "to": label or _label(new), "warm": warm,
                      "mode": "warm" if warm else "checked" if check else "now",
                      "checked_chunks": checked, "whole_copies": len(wholes),
                      "bytes_fetched": self.source.counters.bytes_fetched - fetched0,
                      "warm_seconds": round(t1 - t0, 4), "flip_seconds": round(t2 - t1, 4),
                      "total_seconds": round(t2 - t0, 4), "invalidated_entries": len(stale),
                      "changes": changes or f"{_label(old)} -> {label or _label(new)}",
                      "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            self.ops.info["previous"] = result["from"]
            self.ops.info["last_switch"] = result
            log.info("switched %s -> %s: fetched %d bytes, warm %.3fs, flip %.3fs", result["from"],
                     result["to"], result["bytes_fetched"], t1 - t0, t2 - t1)
            self.ops.info["switches"] = self.ops.info.get("switches", 0) + 1
            wanted = new.files if fill is None else fill
            if not warm and (wanted or wholes):
                for f in wholes:  # the fill writes their new chunks into them (docs/adr/0039)
                    self.ops.begin_whole(f, direct=False)
                self.ops.supervisor.start(f"background fetch of {result['to']}",
                                          lambda: self._fill(wanted, result["to"], wholes))
            elif wholes:
                # After the flip, not before it: the copies overlap the loader's start (in a
                # scratch A/B, writing them before the flip made switch + load 1.2 s longer).
                self.ops.prepare_wholes(wholes)
            if self.on_switch is not None:
                self.on_switch(result)
            return result

    async def switch_manifest(self, m: mf.Manifest, *, warm: bool = False, check: bool = True,
                              digest: str | None = None, allow_model_change: bool = False) -> dict:
        if digest and m.digest != digest:
            raise ManifestError(f"{m.ref} has digest {m.digest}, not the pinned {digest}")
        cur = self.ops.tree.manifest
        if cur is not None and m.id != cur.id and not allow_model_change:
            raise ManifestError(f"{m.ref} is another model than the mounted {cur.ref}; "
                                "pass --allow-model-change to switch to it")
        return await self.switch(Tree.of(m, self.inodes), warm=warm, check=check)

    # -- triggers ---------------------------------------------------------------------------------
    async def watch_file(self, path: str, *, warm: bool, check: bool = True, interval: float = 0.25,
                         digest: str | None = None, allow_model_change: bool = False) -> None:
        """Switch whenever the manifest file is replaced (rename) or rewritten in place.
        A manifest that cannot be used is logged once and the mount stays where it is; anything
        else leaves this task (and its supervisor restarts it)."""
        last = _signature(path)
        bad: tuple | None = None
        while True:
            await trio.sleep(interval)
            sig = _signature(path)
            if sig is None or sig == last or sig == bad:
                continue
            try:
                m = await trio.to_thread.run_sync(_read_manifest, path)
                cur = self.ops.tree.manifest
                if cur is None or m.digest != cur.digest:
                    await self.switch_manifest(m, warm=warm, check=check, digest=digest,
                                               allow_model_change=allow_model_change)
                last, bad = sig, None
            except MlfsError as e:
                if bad != sig:
                    log.error("manifest %s changed but cannot be used, staying on %s: %s", path,
                              _label(self.ops.tree), e)
                    self.ops.info["last_switch_error"] = str(e)
                bad = sig

    async def serve_control(self, sock_path: str, *, digest: str | None = None,
                            record: Callable[[str, BaseException], None] | None = None,
                            listener: socket.socket | None = None) -> None:
        """Answer ``mlfs switch`` requests: one JSON line in, one JSON line out.  A client that
        goes away, sends garbage or stalls costs its own connection only (``record`` counts what
        was not the client's doing).  *listener*: a socket :func:`bind_control` bound to
        *sock_path* already (else it is bound here)."""
        sock = trio.socket.from_stdlib_socket(listener or bind_control(sock_path))
        async def handler(stream: trio.SocketStream) -> None:
            try:
                await self._handle(stream, digest)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                log.info("control client went away before its answer: %s", e)
            except Exception as e:  # noqa: BLE001 - one connection, never the mount
                if record is not None:
                    record("control connection", e)
                else:
                    log.exception("control connection failed")
        try:
            await trio.serve_listeners(handler, [trio.SocketListener(sock)])
        finally:
            try:
                os.unlink(sock_path)
            except OSError:
                pass

    async def _handle(self, stream: trio.SocketStream, digest: str | None) -> None:
        async with stream:
            data = b""
            with trio.move_on_after(30):  # a client that connects and says nothing
                while not data.endswith(b"\n") and len(data) <= MAX_LINE:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    data += chunk
            try:
                req = _parse_request(data)
                m = await trio.to_thread.run_sync(_read_manifest, req["path"])
                result = await self.switch_manifest(
                    m, warm=req["warm"], check=req["check"], digest=req["digest"] or digest,
                    allow_model_change=req["allow_model_change"])
                reply = {"ok": True, "switch": result}
            except MlfsError as e:
                reply = {"ok": False, "error": str(e) or type(e).__name__}
                self.ops.info["last_switch_error"] = reply["error"]
            await stream.send_all(json.dumps(reply).encode() + b"\n")

    async def poll_catalog(self, store: Store, interval: float,
                           catalog: CatalogView | None = None) -> None:
        """Rebuild the catalog view whenever manifests or aliases change in the store.

        *catalog* is the view the mount started from (its first poll then sees no change).  After
        a change only the files of aliases that moved are fetched in the background (a rollout
        by alias); new versions, and everything at the first look, stay lazy.  Filling every
        version a store holds made each node of a fleet fetch every version at mount time."""
        catalog = catalog or CatalogView(store)
        while True:
            await trio.sleep(interval)
            try:
                files, changed = await trio.to_thread.run_sync(catalog.refresh)
            except MlfsError as e:
                log.warning("catalog poll of %s failed: %s", store.describe(), e)
                continue
            if changed:
                moved = tuple(f"{mid}/{alias}/" for mid, alias in catalog.moved)
                await self.switch(Tree(files, self.inodes, self.ops.tree.mtime_ns), check=False,
                                  label=f"catalog ({catalog.summary()})",
                                  changes=catalog.last_changes,
                                  fill=[f for f in files if f.path.startswith(moved)])


class CatalogView:
    """Every version of every model in a store as one tree: ``<id>/<version>/...`` plus
    ``<id>/<alias>/...`` (what a catalog mount shows; :mod:`mlfs.catalog` is the store's catalog
    as the ``ls``/``rm``/``gc`` commands see it)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._manifests: dict[tuple[str, str], tuple[float, mf.Manifest]] = {}
        self._aliases: dict[tuple[str, str], str] = {}
        self._state: tuple = ()
        self.last_changes = ""  # what the last refresh changed: "minilm/stable v1->v2, +minilm@v3"
        #: ``(model id, alias)`` of the aliases the last refresh saw move from one version to
        #: another
        self.moved: set[tuple[str, str]] = set()

    def refresh(self) -> tuple[list[mf.FileEntry], bool]:
        from .catalog import list_aliases

        seen = {}
        for mid, version, info in self.store.list_manifests():
            key = (mid, version)
            cached = self._manifests.get(key)
            if cached is None or cached[0] != info.mtime:
                try:
                    m = self.store.load_manifest(mid, version)
                except (ManifestError, StoreError) as e:
                    log.warning("skipping %s@%s: %s", mid, version, e)
                    continue
                cached = (info.mtime, m)
            seen[key] = cached
        before_versions = set(self._manifests)
        self._manifests = seen
        aliases = {}
        for (mid, version), names in list_aliases(self.store).items():
            for name in names:
                aliases[(mid, name)] = version
        changes = [f"{m}/{a} {self._aliases.get((m, a), '-')}->{v}"
                   for (m, a), v in sorted(aliases.items()) if self._aliases.get((m, a)) != v]
        changes += [f"{m}/{a} removed" for (m, a) in sorted(self._aliases) if (m, a) not in aliases]
        changes += [f"+{m}@{v}" for (m, v) in sorted(set(seen) - before_versions)]
        changes += [f"-{m}@{v}" for (m, v) in sorted(before_versions - set(seen))]
        self.last_changes = ", ".join(changes)
        self.moved = {k for k, v in aliases.items() if self._aliases.get(k, v) != v}
        self._aliases = aliases
        state = (tuple(sorted((k, v[1].digest) for k, v in seen.items())), tuple(sorted(aliases.items())))
        changed = state != self._state
        self._state = state
        return self.files(), changed

    def files(self) -> list[mf.FileEntry]:
        out = []
        for (mid, version), (_, m) in sorted(self._manifests.items()):
            out += [replace(f, path=f"{mid}/{version}/{f.path}", offsets=f.offsets) for f in m.files]
        for (mid, alias), version in sorted(self._aliases.items()):
            target = self._manifests.get((mid, version))
            if target is None or (mid, alias) in self._manifests:
                continue  # dangling alias, or an alias named like a version: the version wins
            out += [replace(f, path=f"{mid}/{alias}/{f.path}", offsets=f.offsets) for f in target[1].files]
        return out

    def summary(self) -> str:
        return f"{len(self._manifests)} versions, {len(self._aliases)} aliases"


def _label(tree: Tree) -> str:
    m = tree.manifest
    return f"{m.id}@{m.version}" if m else "catalog"


def _signature(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)


def _parse_request(data: bytes) -> dict:
    """A control request, validated (the socket's clients are untrusted)."""
    try:
        req = json.loads(data)
    except (ValueError, RecursionError):
        raise ManifestError("request is not a JSON line") from None
    if not isinstance(req, dict) or req.get("op") != "switch":
        raise ManifestError("unknown request (expected {\"op\": \"switch\", ...})")
    path = req.get("path")
    if not isinstance(path, str) or not path or "\0" in path:
        raise ManifestError("switch request without a manifest path")
    digest = req.get("digest")
    if digest is not None and not isinstance(digest, str):
        raise ManifestError("digest must be a string")
    # "warm" defaulted to true before checked switches: a request without "check" is warm or
    # checked as it says, and without either it gets the default (checked).
    return {"path": path, "warm": req.get("warm") is True, "check": req.get("check") is not False,
            "digest": digest,
            "allow_model_change": req.get("allow_model_change") is True}


def _read_manifest(path: str) -> mf.Manifest:
    from .resolve import read_manifest_file

    return read_manifest_file(path)
