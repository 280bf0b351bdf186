"""``mlfs serve``: a read-only HTTP front for any store, reading through this host's cache.

An edge node for a site: mounts (and anything else) read ``http://edge:port/`` as an HTTP store
(:mod:`mlfs.stores.http`), the edge reads the origin (S3, a directory, another HTTP store) once per
chunk — concurrent requests for one chunk cost one origin fetch (:class:`~mlfs.fetch.ChunkSource`'s
single flight) — and keeps chunks in the shared, verified disk cache.  Nothing unverified leaves it:
chunks are checked against their ids, manifests are validated and digest-checked, the index and
aliases are validated.

Responses are made for HTTP caches in front (nginx ``proxy_cache``, Varnish, a CDN): chunks carry a
strong ETag (their id) and ``Cache-Control: public, max-age=31536000, immutable``; manifests, aliases
and the index are short-lived (``max-age`` of a few seconds).  Single byte ranges are honoured.
``/metrics`` is Prometheus text, ``/healthz`` says the process is up.  Only the store's own paths are
served: a chunk id that is not 64 hex digits under its 2-digit directory, a name that is not a valid
id/version/alias, any percent-encoding or dot segment → 400; anything else → 404.

The HTTP protocol is Hypercorn's (h11 on trio), not ours (docs/adr/0016).
"""

from __future__ import annotations

import logging
import re
import signal
from collections import Counter
from dataclasses import dataclass

import trio

from . import index as ix
from . import manifest as mf
from .errors import ManifestError, MlfsError, ObjectNotFound, StorePermissionError
from .fetch import ChunkSource
from .stores import Store

log = logging.getLogger("mlfs.serve")

IMMUTABLE = b"public, max-age=31536000, immutable"
_NAME = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}"
_CHUNK = re.compile(rb"/chunks/([0-9a-f]{2})/([0-9a-f]{64})")
_MANIFEST = re.compile(rf"/manifests/({_NAME})/({_NAME})\.json".encode())
_ALIAS = re.compile(rf"/aliases/({_NAME})/({_NAME})".encode())
_RANGE = re.compile(rb"bytes=(\d*)-(\d*)")


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: tuple = ()


class EdgeApp:
    """The ASGI application.  ``ttl``: seconds manifests, aliases and the index are cached for
    (here and, through ``Cache-Control``, by caches in front)."""

    def __init__(self, store: Store, source: ChunkSource, *, ttl: float = 5.0) -> None:
        self.store = store
        self.source = source
        self.ttl = ttl
        self.requests: Counter[tuple[str, int]] = Counter()
        self.bytes_sent = 0
        self._small: dict[str, tuple[float, Reply]] = {}  # index/manifest/alias replies, by path

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method = scope["method"]
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        path = (scope.get("raw_path") or scope["path"].encode()).split(b"?", 1)[0]
        route = "other"
        try:
            if method not in ("GET", "HEAD"):
                reply = Reply(405, b"read-only\n", ((b"allow", b"GET, HEAD"),))
            else:
                route, reply = await self._route(path, headers)
        except ObjectNotFound:
            reply = Reply(404, b"not found\n")
        except StorePermissionError as e:
            log.error("origin refused: %s", e)
            reply = Reply(502, b"origin refused access\n")
        except MlfsError as e:
            log.warning("%s %s: %s", method, path[:200].decode(errors="replace"), e)
            reply = Reply(502, b"origin failed\n")
        except Exception:  # noqa: BLE001 - one request, never the server
            log.exception("internal error serving %s", path[:200].decode(errors="replace"))
            reply = Reply(500, b"internal error\n")
        self.requests[(route, reply.status)] += 1
        body = b"" if method == "HEAD" else reply.body
        await send({"type": "http.response.start", "status": reply.status,
                    "headers": [(b"content-length", str(len(reply.body)).encode()),
                                *reply.headers]})
        await send({"type": "http.response.body", "body": body})
        self.bytes_sent += len(body)

    async def _route(self, path: bytes, headers: dict) -> tuple[str, Reply]:
        if b"%" in path or b"/." in path or b"//" in path:
            return "bad", Reply(400, b"bad path\n")
        if path == b"/healthz":
            return "health", Reply(200, b"ok\n", ((b"cache-control", b"no-store"),))
        if path == b"/metrics":
            return "metrics", Reply(200, self.metrics().encode(),
                                    ((b"content-type", b"text/plain; version=0.0.4"),))
        if path.startswith(b"/chunks/"):
            m = _CHUNK.fullmatch(path)
            if m is None or m.group(2)[:2] != m.group(1):
                return "chunk", Reply(400, b"bad chunk id\n")
            return "chunk", await self._chunk(m.group(2).decode(), headers)
        if path == b"/index.json":
            return "index", await self._cached(path, self._index)
        m = _MANIFEST.fullmatch(path)
        if m:
            mid, version = m.group(1).decode(), m.group(2).decode()
            return "manifest", await self._cached(path, lambda: self._manifest(mid, version))
        m = _ALIAS.fullmatch(path)
        if m:
            mid, name = m.group(1).decode(), m.group(2).decode()
            return "alias", await self._cached(path, lambda: self._alias(mid, name))
        if path.startswith((b"/manifests/", b"/aliases/")):
            return "bad", Reply(400, b"bad name\n")
        return "other", Reply(404, b"not found\n")

    # -- chunks -----------------------------------------------------------------------------------
    async def _chunk(self, cid: str, headers: dict) -> Reply:
        etag = f'"{cid}"'.encode()
        common = ((b"etag", etag), (b"cache-control", IMMUTABLE),
                  (b"content-type", b"application/octet-stream"), (b"accept-ranges", b"bytes"))
        if etag in [t.strip() for t in headers.get(b"if-none-match", b"").split(b",")]:
            return Reply(304, b"", common)
        data = await self.source.get(cid, None)  # verified against its id, or an error
        rng = headers.get(b"range")
        if rng:
            m = _RANGE.fullmatch(rng.strip())
            if m and (m.group(1) or m.group(2)):
                n = len(data)
                a, b = m.group(1), m.group(2)
                if a:
                    start, end = int(a), min(int(b) + 1 if b else n, n)
                else:  # the last N bytes
                    start, end = max(0, n - int(b)), n
                if start >= n or start >= end:
                    return Reply(416, b"", ((b"content-range", f"bytes */{n}".encode()), *common))
                return Reply(206, bytes(memoryview(data)[start:end]),
                             ((b"content-range", f"bytes {start}-{end - 1}/{n}".encode()), *common))
        return Reply(200, bytes(data) if not isinstance(data, bytes) else data, common)

    # -- small, short-lived documents ---------------------------------------------------------------
    async def _cached(self, path: bytes, fetch) -> Reply:
        key = path.decode()
        now = trio.current_time()
        hit = self._small.get(key)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        reply = await trio.to_thread.run_sync(fetch)
        self._small[key] = (now, reply)
        if len(self._small) > 4096:
            self._small.clear()
        return reply

    def _short(self, body: bytes, ctype: bytes, etag: bytes | None = None) -> Reply:
        headers = [(b"cache-control", f"public, max-age={self.ttl:g}".encode()),
                   (b"content-type", ctype)]
        if etag:
            headers.append((b"etag", etag))
        return Reply(200, body, tuple(headers))

    def _index(self) -> Reply:
        raw = self.store.get_index_bytes()
        if raw is None:
            raise ObjectNotFound("no index.json")
        try:
            ix.loads(raw)
        except ManifestError as e:
            log.error("not serving the origin's index: %s", e)
            return Reply(502, b"origin index is invalid\n")
        return self._short(raw, b"application/json")

    def _manifest(self, mid: str, version: str) -> Reply:
        try:
            m = self.store.load_manifest(mid, version)  # validated, digest checked, re-fetched
        except ManifestError as e:
            log.error("not serving %s@%s: %s", mid, version, e)
            return Reply(502, b"origin manifest is invalid\n")
        return self._short(m.dumps(), b"application/json", f'"{m.digest}"'.encode())

    def _alias(self, mid: str, name: str) -> Reply:
        version = self.store.get_alias(mid, name)
        if version is None:
            raise ObjectNotFound(f"no alias {mid}/{name}")
        try:
            mf.check_name("version", version)
        except ManifestError:
            return Reply(502, b"origin alias is invalid\n")
        return self._short(version.encode(), b"text/plain")

    # -- metrics -------------------------------------------------------------------------------------
    def metrics(self) -> str:
        s = self.source.snapshot()
        lines = ["# TYPE mlfs_serve_requests_total counter"]
        for (route, status), n in sorted(self.requests.items()):
            lines.append(f'mlfs_serve_requests_total{{route="{route}",status="{status}"}} {n}')
        lines += ["# TYPE mlfs_serve_bytes_sent_total counter",
                  f"mlfs_serve_bytes_sent_total {self.bytes_sent}"]
        for key, help_ in (("bytes_fetched", "bytes fetched from the origin"),
                           ("received_bytes", "bytes received from the origin (compressed chunks "
                                              "count as stored)"),
                           ("chunks_fetched", "chunks fetched from the origin"),
                           ("memory_hits", "chunk reads answered from memory"),
                           ("disk_hits", "chunk loads answered by the disk cache"),
                           ("cache_misses", "chunk loads that went to the origin"),
                           ("fetch_errors", "failed origin fetches"),
                           ("corrupt_chunks", "origin bodies that failed verification"),
                           ("retries", "retried origin requests")):
            lines += [f"# HELP mlfs_serve_{key}_total {help_}",
                      f"# TYPE mlfs_serve_{key}_total counter", f"mlfs_serve_{key}_total {s[key]}"]
        return "\n".join(lines) + "\n"


def run(app: EdgeApp, listen: str, *, ready=None, access_log: bool = False) -> None:
    """Serve *app* on ``HOST:PORT`` until SIGTERM/SIGINT.  ``ready(bound addresses)`` is called
    once listening."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    cfg = Config()
    cfg.bind = [listen]
    cfg.accesslog = logging.getLogger("mlfs.serve.access") if access_log else None
    cfg.errorlog = logging.getLogger("mlfs.serve.hypercorn")
    cfg.keep_alive_timeout = 75
    cfg.graceful_timeout = 5

    async def main() -> None:
        stop = trio.Event()

        async def signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    stop.set()
                    return

        async with trio.open_nursery() as n:
            n.start_soon(signals)
            bound = await n.start(lambda task_status=trio.TASK_STATUS_IGNORED: serve(
                app, cfg, shutdown_trigger=stop.wait, task_status=task_status))
            if ready:
                ready(bound)
            await stop.wait()
            n.cancel_scope.deadline = trio.current_time() + 10

    trio.run(main)
