"""The S3 store (boto3): any S3-compatible endpoint.

The endpoint comes from ``--endpoint-url`` or the standard ``AWS_ENDPOINT_URL``; credentials and
region from the standard AWS chain.  boto3's own retries are turned off: ``Store.retry`` owns the
retry policy, so the time a read may take has one bound, not a product of two.

Whole-object GETs (every chunk a mount fetches) take a shorter path than a boto3 call: the same
SigV4 signer and HTTP library, without botocore's per-call machinery (:class:`DirectGet`,
docs/adr/0010).  Anything that path does not expect is answered by boto3 instead.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Iterator
from urllib.parse import quote, urlsplit
from xml.etree import ElementTree

import boto3
import botocore.exceptions as bx
import botocore.session
import urllib3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.httpsession import get_cert_path

from .. import config
from ..errors import ObjectNotFound, StoreNotFound, StorePermissionError, StoreUnavailable
from .base import ObjectInfo, Store

log = logging.getLogger("mlfs.s3")

_TEMP_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
               "ServiceUnavailable", "503", "500", "502", "504", "RequestTimeTooSkewed",
               "ConditionalRequestConflict"}
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                 "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled"}
_TEMP_EXC = (bx.EndpointConnectionError, bx.ConnectionClosedError, bx.ReadTimeoutError,
             bx.ConnectTimeoutError, bx.IncompleteReadError, bx.ResponseStreamingError,
             bx.ProxyConnectionError, bx.FlexibleChecksumError, bx.HTTPClientError,
             ConnectionError, TimeoutError)


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 max_connections: int = 32) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        # Bodies are checked against their blake3 ids (chunks) or parsed and validated (manifests),
        # so botocore's CRC32 of every GET body (0.45 s of CPU per GiB here) would check them twice.
        cfg = Config(retries={"max_attempts": 1, "mode": "standard"},
                     connect_timeout=config.S3_CONNECT_TIMEOUT, read_timeout=config.S3_READ_TIMEOUT,
                     max_pool_connections=max_connections, s3={"addressing_style": "path"},
                     response_checksum_validation="when_required")
        self._local = threading.local()
        self._session = boto3.session.Session()
        self._cfg = cfg
        self._client_lock = threading.Lock()
        self._client = self._session.client("s3", endpoint_url=endpoint_url, config=cfg)
        self.direct: DirectGet | None = DirectGet.create(self, max_connections)

    def describe(self) -> str:
        return self.url + (f" at {self.endpoint_url}" if self.endpoint_url else "")

    @property
    def client(self):  # boto3 clients are thread-safe; one shares the connection pool
        return self._client

    def is_temp_failure(self, exc: BaseException) -> bool:
        if isinstance(exc, (StoreUnavailable, *_TEMP_EXC)):
            return True
        if isinstance(exc, bx.ClientError):
            err = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return err.get("Code") in _TEMP_CODES or status >= 500 or status == 429
        return False

    def _map(self, e: Exception, key: str) -> Exception:
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
    """Whole-object GETs signed by botocore's SigV4 signer and sent with urllib3, without a boto3
    call around them (docs/adr/0010).

    A boto3 ``get_object`` costs ~3.3 ms of CPU here before a byte moves (parameter validation,
    endpoint rules, event hooks, response parsing); this path ~0.75 ms, and a cold read makes one
    GET per chunk.  It is used only where it is the same request boto3 would send: a plain
    http(s) endpoint, path-style addressing, no proxy, credentials present.  It answers 200 (the
    body), 404 (ObjectNotFound or StoreNotFound) and 429/5xx (temporary, retried by
    ``Store.retry``); any other status raises :class:`NotDirect` and the caller asks boto3.
    """

    def __init__(self, store: S3Store, base_url: str, region: str, credentials,
                 ca_certs: str | None, max_connections: int) -> None:
        self.store = store
        self.base_url = base_url
        self.region = region
        self.credentials = credentials
        kw = {"ca_certs": ca_certs, "cert_reqs": "CERT_REQUIRED"} if ca_certs else {}
        self.pool = urllib3.PoolManager(maxsize=max_connections, retries=False, **kw)
        self.timeout = urllib3.Timeout(connect=config.S3_CONNECT_TIMEOUT,
                                       read=config.S3_READ_TIMEOUT)

    @classmethod
    def create(cls, store: S3Store, max_connections: int) -> DirectGet | None:
        """The direct path for *store*, or None where boto3 must do every request."""
        if not config.S3_DIRECT:
            return None
        if any(os.environ.get(v) for v in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy",
                                           "https_proxy", "all_proxy")):
            return None  # botocore knows proxies; this path does not
        endpoint = store.client.meta.endpoint_url or ""
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or parts.query or parts.fragment:
            return None
        credentials = store._session.get_credentials()
        if credentials is None:
            return None  # boto3 then raises its clear "no credentials" error
        ca_certs = None
        if parts.scheme == "https":
            ca_certs = (botocore.session.Session().get_config_variable("ca_bundle")
                        or get_cert_path(True))
        base = f"{endpoint.rstrip('/')}/{quote(store.bucket, safe='')}/"
        return cls(store, base, store.client.meta.region_name or "us-east-1", credentials,
                   ca_certs, max_connections)

    def head_bucket(self) -> None:
        """Return if the bucket answers; StoreNotFound if it does not exist."""
        url = self.base_url.rstrip("/")
        request = AWSRequest(method="HEAD", url=url)
        S3SigV4Auth(self.credentials.get_frozen_credentials(), "s3", self.region).add_auth(request)
        try:
            resp = self.pool.request("HEAD", url, headers=dict(request.headers.items()),
                                     redirect=False, timeout=self.timeout)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise ConnectionError(f"HEAD bucket: {type(e).__name__}: {e}") from None
        if resp.status == 200:
            return
        if resp.status == 404:
            raise StoreNotFound(f"bucket {self.store.bucket!r} does not exist "
                                f"({self.store.describe()})")
        if resp.status >= 500 or resp.status == 429:
            raise StoreUnavailable(f"HEAD bucket: HTTP {resp.status}")
        raise NotDirect(f"HTTP {resp.status}")

    def get(self, full_key: str, key: str) -> bytes:
        url = self.base_url + quote(full_key, safe="/~")
        request = AWSRequest(method="GET", url=url)
        S3SigV4Auth(self.credentials.get_frozen_credentials(), "s3", self.region).add_auth(request)
        try:
            resp = self.pool.request("GET", url, headers=dict(request.headers.items()),
                                     preload_content=False, redirect=False, timeout=self.timeout)
            try:
                body = resp.read(decode_content=False)
            finally:
                resp.release_conn()
        except (urllib3.exceptions.HTTPError, OSError) as e:  # refused, reset, timed out, cut short
            raise ConnectionError(f"GET {key}: {type(e).__name__}: {e}") from None
        status = resp.status
        if status == 200:
            length = resp.headers.get("Content-Length", str(len(body)))
            if length != str(len(body)):  # urllib3 checks this too; a short body is a retry
                raise ConnectionError(f"GET {key}: {len(body)} bytes, Content-Length {length[:20]!r}")
            return body
        code = _error_code(body)
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
    try:
        node = ElementTree.fromstring(body).find("Code") if body else None
    except ElementTree.ParseError:
        return ""
    return (node.text or "") if node is not None else ""
