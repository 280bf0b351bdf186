"""A read-only store under an ``http://`` or ``https://`` URL prefix.

Anything that serves the store's files by path works: a public bucket, a static web server (nginx),
a CDN, an HTTP cache, or ``mlfs serve``.  Chunks, manifests and aliases are plain GETs of
``<prefix>/chunks/<2 hex>/<id>``, ``<prefix>/manifests/<id>/<version>.json`` and
``<prefix>/aliases/<id>/<alias>``; listing (``ls``, catalog mounts) reads ``<prefix>/index.json``
(:mod:`mlfs.index`), which the writable store behind it keeps current.

Nothing read here is trusted: chunks are verified against their ids by the caller (as from S3),
manifests are validated and digest-checked, the index is validated.  Connections are kept alive
and pooled (mlfs.rawhttp for plain http, urllib3 for https and proxies).
``HTTP_PROXY``/``HTTPS_PROXY``/``NO_PROXY`` are honoured, so a site proxy or a P2P daemon
(Dragonfly's dfdaemon) can sit in front.  ``MLFS_HTTP_HEADER="Name: value"`` adds one header to
every request to the store's own origin (a bearer token, say).  Redirects (a CDN handing out
signed URLs) are followed, up to 5 per request; the header is not sent across origins.  Errors
are classified as for S3: refused connections, timeouts, resets, truncated bodies, 429 and 5xx
are temporary (retried by ``Store.retry``); 404 is a missing object; 401/403 a refusal; anything
else a one-line StoreError.
"""

from __future__ import annotations

import os
from typing import Iterator
from urllib.parse import quote, urljoin, urlsplit


from .. import config
from .. import index as ix
from ..errors import (ManifestError, ObjectNotFound, StoreError, StoreNotFound,
                      StorePermissionError, StoreUnavailable, UsageError)
from ..rawhttp import RawHttp, TooLarge
from .base import INDEX_KEY, MAX_INDEX, ObjectInfo, Store


class HttpStore(Store):
    writable = False

    def __init__(self, url: str, *, max_connections: int = 32) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise UsageError(f"invalid HTTP store URL {url!r}: expected http(s)://host[:port]/prefix")
        self.url = url.rstrip("/")
        self.base = self.url + "/"
        self.headers = {"User-Agent": "mlfs"}
        extra = config.HTTP_HEADER
        if extra:
            name, sep, value = extra.partition(":")
            if not sep or not name.strip():
                raise UsageError("MLFS_HTTP_HEADER must look like 'Name: value'")
            self.headers[name.strip()] = value.strip()
        kw = {"maxsize": max_connections, "retries": False, "block": False}
        if parts.scheme == "https":
            ca = os.environ.get("AWS_CA_BUNDLE") or os.environ.get("REQUESTS_CA_BUNDLE") \
                or os.environ.get("SSL_CERT_FILE")
            kw.update(cert_reqs="CERT_REQUIRED", **({"ca_certs": ca} if ca else {}))
        proxy = _proxy_for(parts.scheme, parts.hostname or "")
        self._pool_args = (proxy, kw)
        self._pool = None
        # Plain http without a proxy: bodies read with one recv each (mlfs.rawhttp,
        # docs/adr/0020).  A body encoded unasked is asked again through urllib3, which decodes.
        self.raw = None
        if parts.scheme == "http" and not proxy and config.RAW_HTTP:
            self.raw = RawHttp.for_url(url, max_connections)

    @property
    def pool(self):
        """urllib3's pool, made (and urllib3 imported: ~0.05 s, ~100 modules) on first use: plain
        http without a proxy never needs it."""
        if self._pool is None:
            import urllib3

            proxy, kw = self._pool_args
            self.timeout = urllib3.Timeout(connect=config.S3_CONNECT_TIMEOUT,
                                           read=config.S3_READ_TIMEOUT)
            self._pool = urllib3.ProxyManager(proxy, **kw) if proxy else urllib3.PoolManager(**kw)
        return self._pool

    def describe(self) -> str:
        return self.url

    def is_temp_failure(self, exc: BaseException) -> bool:
        return isinstance(exc, (StoreUnavailable, ConnectionError, TimeoutError))

    #: Redirects followed per request (a CDN or object store handing out a signed URL).
    MAX_REDIRECTS = 5

    def _request(self, method: str, key: str) -> tuple[int, bytes, dict]:
        """``(status, body, headers)`` for *key*, after up to MAX_REDIRECTS redirects.  A header
        from ``MLFS_HTTP_HEADER`` (a token, say) goes only to the store's own origin; a redirect
        elsewhere than http(s) is an error."""
        url = self.base + quote(key, safe="/~")
        origin = urlsplit(self.url)[:2]
        headers = self.headers
        for _ in range(self.MAX_REDIRECTS + 1):
            status, body, got = self._request_url(method, url, key, headers)
            location = got.get("location")
            if status not in (301, 302, 303, 307, 308) or not location:
                return status, body, got
            url = urljoin(url, location)
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise StoreError(f"{key} in {self.url}: redirected to {location[:100]!r}, "
                                 "not an http(s) URL")
            if parts[:2] != origin:
                headers = {"User-Agent": self.headers["User-Agent"]}
        raise StoreError(f"{key} in {self.url}: more than {self.MAX_REDIRECTS} redirects")

    def _request_url(self, method: str, url: str, key: str,
                     headers: dict) -> tuple[int, bytes, dict]:
        limit = MAX_INDEX if key == INDEX_KEY else config.MAX_CHUNK_SIZE + (1 << 20)
        if self.raw is not None and self.raw.serves(url):
            try:
                resp = self.raw.request(method, url, headers, max_body=limit)
            except TooLarge:
                raise StoreError(f"{key} in {self.url} is larger than any object mlfs writes") \
                    from None
            except OSError as e:  # refused, reset, timed out, cut short, malformed, too long
                raise ConnectionError(f"{method} {key}: {type(e).__name__}: {e}") from None
            if resp.headers.get("content-encoding", "identity").lower() == "identity":
                return resp.status, resp.body, resp.headers
        import urllib3

        pool = self.pool
        try:
            resp = pool.request(method, url, headers=headers, preload_content=False,
                                redirect=False, timeout=self.timeout)
            try:
                body = resp.read(limit + 1, decode_content=True) if method == "GET" else b""
            except BaseException:
                resp.close()
                raise
            if len(body) > limit:
                resp.close()  # never hand a half-read connection back to the pool
            else:
                resp.release_conn()
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise ConnectionError(f"{method} {key}: {type(e).__name__}: {e}") from None
        status = resp.status
        if status == 200 and method == "GET":
            if len(body) > limit:
                raise StoreError(f"{key} in {self.url} is larger than any object mlfs writes")
            length = resp.headers.get("Content-Length")
            if length is not None and "Content-Encoding" not in resp.headers \
                    and length != str(len(body)):
                raise ConnectionError(f"GET {key}: {len(body)} bytes, Content-Length {length[:20]!r}")
        return status, body, {k.lower(): v for k, v in resp.headers.items()}

    def _check_status(self, status: int, key: str) -> None:
        if status in (200, 204):
            return
        if status == 404 or status == 410:
            raise ObjectNotFound(f"{key} not found in {self.url}")
        if status in (401, 403):
            raise StorePermissionError(f"access to {self.url} denied (HTTP {status}); "
                                       "MLFS_HTTP_HEADER can carry a token")
        if status >= 500 or status in (408, 429):
            raise StoreUnavailable(f"GET {key}: HTTP {status}")
        raise StoreError(f"GET {key} from {self.url}: HTTP {status}")

    # -- primitives -------------------------------------------------------------------------------
    def _get(self, key: str) -> bytes:
        status, body, _ = self._request("GET", key)
        self._check_status(status, key)
        return body

    def _head(self, key: str) -> ObjectInfo | None:
        status, _, headers = self._request("HEAD", key)
        if status in (404, 410):
            return None
        self._check_status(status, key)
        try:
            size = int(headers.get("content-length", "0"))
        except ValueError:
            size = 0
        return ObjectInfo(key, size, 0.0)

    def _refuse(self, *args, **kw):
        raise StoreError(f"{self.url} is a read-only HTTP store")

    _put = _create = _delete = _touch = _refuse

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        raise StoreError(f"{self.url} cannot list its {prefix.rstrip('/')}: an HTTP store is "
                         "read through its index.json (mlfs ls, catalog mounts)")

    def check(self) -> None:
        try:
            self.retry(lambda: self._head(INDEX_KEY), "reach store", deadline=min(config.RETRY_DEADLINE, 10))
        except StoreUnavailable as e:
            raise StoreUnavailable(f"cannot reach {self.url}: {e}") from None
        except StoreNotFound:
            raise

    # -- listing through the index ------------------------------------------------------------------
    def index(self) -> ix.Index:
        raw = self.get_index_bytes()
        if raw is None:
            raise ObjectNotFound(f"{self.url} has no index.json, so its versions cannot be listed "
                                 "(mlfs index STORE rebuilds it in the store behind it)")
        try:
            return ix.loads(raw)
        except ManifestError as e:
            raise StoreError(f"{self.url}: {e}") from None

    def list_manifests(self) -> Iterator[tuple[str, str, ObjectInfo]]:
        for v in self.index().versions:
            yield v["id"], v["version"], ObjectInfo(f"manifests/{v['id']}/{v['version']}.json",
                                                    0, float(v.get("mtime", 0)))

    def aliases(self) -> Iterator[tuple[str, str, str]]:
        for a in self.index().aliases:
            yield a["id"], a["alias"], a["version"]

    def list_chunks(self):
        raise StoreError(f"{self.url} cannot list chunks: gc and verify need the writable store "
                         "behind it")


def _proxy_for(scheme: str, host: str) -> str | None:
    """The proxy for *host* from the standard environment (``*_PROXY``, ``NO_PROXY``)."""
    if not any(k.lower().endswith("_proxy") and v for k, v in os.environ.items()):
        return None  # without importing urllib.request (~0.05 s)
    import urllib.request

    proxies = urllib.request.getproxies()
    proxy = proxies.get(scheme)
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    return proxy
