"""``open_store(url)``: a store from its URL.

- a plain path or ``file:///abs/path`` → :class:`LocalStore` (the embedded default)
- ``s3://bucket/prefix`` → :class:`S3Store`
- ``http(s)://host/prefix`` → :class:`HttpStore` (read-only: a static site, a CDN, ``mlfs serve``)
"""

from __future__ import annotations

from urllib.parse import urlparse

from ..errors import UsageError
from .base import ObjectInfo, Store, chunk_key, manifest_key
from .local import LocalStore


def _open_s3(url: str, endpoint_url: str | None, create: bool) -> Store:
    from .s3 import S3Store  # boto3 is imported only when an S3 store is used

    p = urlparse(url)
    if not p.netloc:
        raise UsageError(f"invalid S3 store URL {url!r}: expected s3://bucket[/prefix]")
    return S3Store(p.netloc, p.path, endpoint_url=endpoint_url)


def _open_file(url: str, endpoint_url: str | None, create: bool) -> Store:
    p = urlparse(url)
    if p.netloc not in ("", "localhost"):
        raise UsageError(f"invalid file store URL {url!r}: expected file:///absolute/path")
    return LocalStore(p.path, create=create)


def _open_http(url: str, endpoint_url: str | None, create: bool) -> Store:
    from .http import HttpStore

    return HttpStore(url)


_SCHEMES = {"s3": _open_s3, "file": _open_file, "http": _open_http, "https": _open_http}


def open_store(url: str, *, endpoint_url: str | None = None, create: bool = False) -> Store:
    """Open the store named by *url*; ``create`` makes a missing local directory."""
    if not url:
        raise UsageError("no store given: pass --store or set MLFS_STORE")
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if not scheme:
        return LocalStore(url, create=create)
    try:
        opener = _SCHEMES[scheme]
    except KeyError:
        raise UsageError(f"unsupported store URL {url!r} (use a path, file://, s3:// or http(s)://)") from None
    return opener(url, endpoint_url, create)


__all__ = ["open_store", "Store", "LocalStore", "ObjectInfo", "chunk_key", "manifest_key"]
