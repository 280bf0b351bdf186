"""The S3 store (boto3): any S3-compatible endpoint.

The endpoint comes from ``--endpoint-url`` or the standard ``AWS_ENDPOINT_URL``; credentials and
region from the standard AWS chain.  boto3's own retries are turned off: ``Store.retry`` owns the
retry policy, so the time a read may take has one bound, not a product of two.

Whole-object GETs (every chunk a mount fetches) take a shorter path than a boto3 call: a SigV4
signature, then mlfs.rawhttp (plain http) or urllib3 (https), without botocore's per-call machinery
(:class:`DirectGet`, docs/adr/0010, 0020).
Anything that path does not expect is answered by boto3 instead.  boto3 itself is imported and its
client built on first use: a mount whose environment names the endpoint, region and keys never
needs it (docs/adr/0018).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Iterator
from urllib.parse import quote, urlsplit

from .. import config
from ..errors import ObjectNotFound, StoreNotFound, StorePermissionError, StoreUnavailable
from .base import ObjectInfo, Store
from .sigv4 import Signer

log = logging.getLogger("mlfs.s3")

_TEMP_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
               "ServiceUnavailable", "503", "500", "502", "504", "RequestTimeTooSkewed",
               "ConditionalRequestConflict"}
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                 "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled"}


def _botocore_temp_errors() -> tuple[type[BaseException], ...]:
    import botocore.exceptions as bx

    return (bx.EndpointConnectionError, bx.ConnectionClosedError, bx.ReadTimeoutError,
            bx.ConnectTimeoutError, bx.IncompleteReadError, bx.ResponseStreamingError,
            bx.ProxyConnectionError, bx.FlexibleChecksumError, bx.HTTPClientError)


def _is_botocore(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("botocore")


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 max_connections: int = 32) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.max_connections = max_connections
        self._client_lock = threading.Lock()
        self._client_obj = None
        self._session_obj = None
        self.direct: DirectGet | None = DirectGet.create(self, max_connections)

    def _session(self):
        import boto3

        if self._session_obj is None:
            self._session_obj = boto3.session.Session()
        return self._session_obj

    def describe(self) -> str:
        return self.url + (f" at {self.endpoint_url}" if self.endpoint_url else "")

    @property
    def client(self):
        """The boto3 client, built on first use (boto3 clients are thread-safe; one shares the
        connection pool)."""
        with self._client_lock:
            if self._client_obj is None:
                from botocore.config import Config

                # Bodies are checked against their blake3 ids (chunks) or parsed and validated
                # (manifests), so botocore's CRC32 of every GET body (0.45 s of CPU per GiB here)
                # would check them twice.
                cfg = Config(retries={"max_attempts": 1, "mode": "standard"},
                             connect_timeout=config.S3_CONNECT_TIMEOUT,
                             read_timeout=config.S3_READ_TIMEOUT,
                             max_pool_connections=self.max_connections,
                             s3={"addressing_style": "path"},
                             response_checksum_validation="when_required")
                self._client_obj = self._session().client("s3", endpoint_url=self.endpoint_url,
                                                          config=cfg)
            return self._client_obj

    def is_temp_failure(self, exc: BaseException) -> bool:
        if isinstance(exc, (StoreUnavailable, ConnectionError, TimeoutError)):
            return True
        if not _is_botocore(exc):
            return False
        import botocore.exceptions as bx

        if isinstance(exc, _botocore_temp_errors()):
            return True
        if isinstance(exc, bx.ClientError):
            err = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return err.get("Code") in _TEMP_CODES or status >= 500 or status == 429
        return False

    def _map(self, e: Exception, key: str) -> Exception:
        if not _is_botocore(e):
            return e
        import botocore.exceptions as bx

        if isinstance(e, bx.ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code == "NoSuchBucket":
                return StoreNotFound(f"bucket {self.bucket!r} does not exist ({self.describe()})")
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                return ObjectNotFound(f"{key} not found in {self.describe()}")
            if status == 403 or code in _DENIED_CODES:
                return StorePermissionError(f"access to {self.describe()} denied ({code})")
        if isinstance(e, bx.NoCredentialsError):
            return StorePermissionError(f"no AWS credentials found for {self.describe()}")
        return e

    def _call(self, key: str, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - mapped to our hierarchy or re-raised as is
            mapped = self._map(e, key)
            if mapped is e:
                raise
            raise mapped from None

    def check(self) -> None:
        def head():
            direct = self.direct
            if direct is not None:  # boto3's first call costs ~0.1 s of set-up: not before a mount
                try:
                    return direct.head_bucket()
                except NotDirect:
                    pass  # boto3's answer below stands
            import botocore.exceptions as bx

            try:
                self.client.head_bucket(Bucket=self.bucket)
            except bx.ClientError as e:
                if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    raise StoreNotFound(
                        f"bucket {self.bucket!r} does not exist ({self.describe()})") from None
                raise
        try:
            self.retry(lambda: self._call("", head), "reach store", deadline=min(config.RETRY_DEADLINE, 10))
        except StoreUnavailable as e:
            raise StoreUnavailable(f"cannot reach {self.describe()}: {e}") from None

    def _get(self, key: str) -> bytes:
        def get():
            resp = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
            return resp["Body"].read()
        direct = self.direct
        if direct is not None:
            try:
                return direct.get(self.prefix + key, key)
            except NotDirect as e:
                data = self._call(key, get)  # boto3's answer stands, error or bytes
                log.warning("direct GET of %s got %s where boto3 succeeded: using boto3 from now on",
                            key, e)
                self.direct = None
                return data
        return self._call(key, get)

    def _put(self, key: str, data: bytes | memoryview) -> None:
        body = bytes(data) if isinstance(data, memoryview) else data
        self._call(key, lambda: self.client.put_object(Bucket=self.bucket, Key=self.prefix + key,
                                                       Body=body))

    def _create(self, key: str, data: bytes) -> bool:
        """A conditional PUT (``If-None-Match: *``): S3 answers 412 if the key exists, and of
        concurrent conditional PUTs exactly one succeeds (409 to the others while one is in
        flight: retried, then 412).  A server that ignores the header would replace the object;
        docs/adr/0013 says which servers honour it."""
        def put():
            import botocore.exceptions as bx

            try:
                self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data,
                                       IfNoneMatch="*")
                return True
            except bx.ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if code == "PreconditionFailed" or status == 412:
                    return False
                raise
        return self._call(key, put)

    def _head(self, key: str) -> ObjectInfo | None:
        direct = self.direct
        if direct is not None:
            try:
                return direct.head(self.prefix + key, key)
            except NotDirect:
                pass  # boto3's answer below stands
        try:
            r = self._call(key, lambda: self.client.head_object(Bucket=self.bucket,
                                                                Key=self.prefix + key))
        except ObjectNotFound:
            return None
        return ObjectInfo(key, r["ContentLength"], r["LastModified"].timestamp())

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Page by page, each page its own retried request (a failed page is asked for again,
        never mistaken for the end of the listing)."""
        token = None
        while True:
            kw = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
            if token:
                kw["ContinuationToken"] = token
            page = self.retry(lambda: self._call(prefix, lambda: self.client.list_objects_v2(**kw)),
                              "list")
            for obj in page.get("Contents", []):
                yield ObjectInfo(obj["Key"][len(self.prefix):], obj["Size"],
                                 obj["LastModified"].timestamp())
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def _touch(self, key: str) -> None:
        # A server-side copy onto itself renews LastModified without moving the bytes.
        self._call(key, lambda: self.client.copy_object(
            Bucket=self.bucket, Key=self.prefix + key, MetadataDirective="REPLACE",
            CopySource={"Bucket": self.bucket, "Key": self.prefix + key}))

    def _delete(self, key: str) -> None:
        self._call(key, lambda: self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key))


class NotDirect(Exception):
    """A response the direct path does not handle (redirect, 400, 403...): ask boto3 instead."""


class DirectGet:
    """Whole-object GETs signed with SigV4 and sent without a boto3 call around them (docs/adr/0010):
    over plain http by :mod:`mlfs.rawhttp` (one ``recv`` per body, docs/adr/0020), over https by
    urllib3.

    A boto3 ``get_object`` costs ~3.3 ms of CPU here before a byte moves (parameter validation,
    endpoint rules, event hooks, response parsing); this path ~0.75 ms, and a cold read makes one
    GET per chunk.  It is used only where it is the same request boto3 would send: a plain
    http(s) endpoint, path-style addressing, no proxy, credentials present.  It answers 200 (the
    body), 404 (ObjectNotFound or StoreNotFound) and 429/5xx (temporary, retried by
    ``Store.retry``); any other status raises :class:`NotDirect` and the caller asks boto3.

    Where the environment names the endpoint, region and static keys (the usual container set-up)
    it signs with :mod:`mlfs.stores.sigv4` and boto3 is not imported at all; otherwise boto3's
    session resolves them (profiles, SSO, instance roles) and botocore signs.
    """

    def __init__(self, store: S3Store, base_url: str, sign, ca_certs: str | None,
                 max_connections: int) -> None:
        self.store = store
        self.base_url = base_url
        self.sign = sign  # (method, url) -> headers
        self._pool_args = {"maxsize": max_connections, "retries": False,
                           **({"ca_certs": ca_certs, "cert_reqs": "CERT_REQUIRED"} if ca_certs
                              else {})}
        self._pool = None
        # Plain http: bodies read with one recv each (mlfs.rawhttp, docs/adr/0020).
        self.raw = None
        parts = urlsplit(base_url)
        if parts.scheme == "http" and config.RAW_HTTP:
            from ..rawhttp import RawHttp

            self.raw = RawHttp.for_url(base_url, max_connections)

    @property
    def pool(self):
        """urllib3's pool, made (and urllib3 imported: ~0.05 s, ~100 modules) on first use: a
        mount over plain http never needs it."""
        if self._pool is None:
            import urllib3

            self._pool = urllib3.PoolManager(**self._pool_args)
            self.timeout = urllib3.Timeout(connect=config.S3_CONNECT_TIMEOUT,
                                           read=config.S3_READ_TIMEOUT)
        return self._pool

    def _send(self, method: str, url: str, key: str) -> tuple[int, bytes, dict]:
        """``(status, body, headers)`` of an unredirected, signed *method* *url*; ConnectionError
        for anything that did not bring a whole response."""
        if self.raw is not None:
            try:
                resp = self.raw.request(method, url, self.sign(method, url),
                                        max_body=config.MAX_CHUNK_SIZE + (1 << 20))
            except OSError as e:  # refused, reset, timed out, cut short, malformed
                raise ConnectionError(f"{method} {key}: {type(e).__name__}: {e}") from None
            return resp.status, resp.body, resp.headers
        import urllib3

        pool = self.pool
        try:
            resp = pool.request(method, url, headers=self.sign(method, url),
                                preload_content=False, redirect=False, timeout=self.timeout)
            try:
                body = resp.read(decode_content=False) if method == "GET" else b""
            finally:
                resp.release_conn()
        except (urllib3.exceptions.HTTPError, OSError) as e:  # refused, reset, timed out, cut short
            raise ConnectionError(f"{method} {key}: {type(e).__name__}: {e}") from None
        if method == "GET":
            length = resp.headers.get("Content-Length", str(len(body)))
            if length != str(len(body)):  # urllib3 checks this too; a short body is a retry
                raise ConnectionError(f"GET {key}: {len(body)} bytes, Content-Length {length[:20]!r}")
        return resp.status, body, {k.lower(): v for k, v in resp.headers.items()}

    @classmethod
    def create(cls, store: S3Store, max_connections: int) -> DirectGet | None:
        """The direct path for *store*, or None where boto3 must do every request."""
        if not config.S3_DIRECT:
            return None
        env = os.environ
        if any(env.get(v) for v in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy",
                                    "https_proxy", "all_proxy")):
            return None  # botocore knows proxies; this path does not
        fast = _from_environment(store.endpoint_url)
        ca_bundle = env.get("AWS_CA_BUNDLE")
        if fast is not None:
            endpoint, signer = fast
            sign = signer.headers
        else:
            import botocore.session

            ca_bundle = botocore.session.Session().get_config_variable("ca_bundle")
            endpoint = store.client.meta.endpoint_url or ""
            credentials = store._session().get_credentials()
            if credentials is None:
                return None  # boto3 then raises its clear "no credentials" error
            sign = _botocore_signer(credentials, store.client.meta.region_name or "us-east-1")
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or parts.query or parts.fragment:
            return None
        ca_certs = None
        if parts.scheme == "https":
            ca_certs = ca_bundle or _default_ca_bundle()
            if ca_certs is None:
                return None
        base = f"{endpoint.rstrip('/')}/{quote(store.bucket, safe='')}/"
        return cls(store, base, sign, ca_certs, max_connections)

    def head_bucket(self) -> None:
        """Return if the bucket answers; StoreNotFound if it does not exist."""
        status, _, _ = self._send("HEAD", self.base_url.rstrip("/"), "bucket")
        if status == 200:
            return
        if status == 404:
            raise StoreNotFound(f"bucket {self.store.bucket!r} does not exist "
                                f"({self.store.describe()})")
        if status >= 500 or status == 429:
            raise StoreUnavailable(f"HEAD bucket: HTTP {status}")
        raise NotDirect(f"HTTP {status}")

    def head(self, full_key: str, key: str) -> ObjectInfo | None:
        """The object's size and time, None if it does not exist (a switch's check that every
        chunk it will need is there; boto3 would cost the daemon its import first)."""
        status, _, headers = self._send("HEAD", self.base_url + quote(full_key, safe="/~"), key)
        if status == 200:
            from email.utils import parsedate_to_datetime

            try:
                size = int(headers.get("content-length", ""))
                mtime = parsedate_to_datetime(headers.get("last-modified", "")).timestamp()
            except (TypeError, ValueError):
                raise NotDirect("HEAD without a usable Content-Length or Last-Modified") from None
            return ObjectInfo(key, size, mtime)
        if status == 404:
            return None
        if status >= 500 or status == 429:
            raise StoreUnavailable(f"HEAD {key}: HTTP {status}")
        raise NotDirect(f"HTTP {status}")

    def get(self, full_key: str, key: str) -> bytes:
        """The object's body."""
        status, body, _ = self._send("GET", self.base_url + quote(full_key, safe="/~"), key)
        if status == 200:
            return body
        code = _error_code(bytes(body[:1 << 16]))
        if status == 404:
            if code == "NoSuchBucket":
                raise StoreNotFound(f"bucket {self.store.bucket!r} does not exist "
                                    f"({self.store.describe()})")
            raise ObjectNotFound(f"{key} not found in {self.store.describe()}")
        if status >= 500 or status == 429 or code in _TEMP_CODES:
            raise StoreUnavailable(f"GET {key}: HTTP {status} {code}".rstrip())
        raise NotDirect(f"HTTP {status} {code}".rstrip())


def _error_code(body: bytes) -> str:
    """The ``<Code>`` of an S3 error document, or "" if there is none."""
    from xml.etree import ElementTree

    try:
        node = ElementTree.fromstring(body).find("Code") if body else None
    except ElementTree.ParseError:
        return ""
    return (node.text or "") if node is not None else ""


def _from_environment(endpoint_url: str | None) -> tuple[str, Signer] | None:
    """``(endpoint, signer)`` when the environment settles everything botocore would resolve for
    the direct path — an explicit endpoint, a region and static keys — or None (ask boto3).  The
    precedence is botocore's: an argument, then ``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``;
    keys in the environment come first in its credential chain."""
    env = os.environ
    if env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true" and not endpoint_url:
        return None
    endpoint = endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    region = env.get("AWS_DEFAULT_REGION")
    if not (endpoint and key and secret and region):
        return None
    return endpoint, Signer(key, secret, region, token=env.get("AWS_SESSION_TOKEN") or None)


def _botocore_signer(credentials, region: str):
    """Sign with botocore (credentials that refresh: roles, SSO, web identity)."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest

    def sign(method: str, url: str) -> dict[str, str]:
        request = AWSRequest(method=method, url=url)
        S3SigV4Auth(credentials.get_frozen_credentials(), "s3", region).add_auth(request)
        return dict(request.headers.items())
    return sign


def _default_ca_bundle() -> str | None:
    try:
        import certifi
    except ImportError:
        return None
    return certifi.where()
