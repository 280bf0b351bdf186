"""The S3 store (boto3): any S3-compatible endpoint.

The endpoint comes from ``--endpoint-url`` or the standard ``AWS_ENDPOINT_URL``; credentials and
region from the standard AWS chain.  boto3's own retries are turned off: ``Store.retry`` owns the
retry policy, so the time a read may take has one bound, not a product of two.
"""

from __future__ import annotations

import threading
from typing import Iterator

import boto3
import botocore.exceptions as bx
from botocore.config import Config

from .. import config
from ..errors import ObjectNotFound, StoreNotFound, StorePermissionError, StoreUnavailable
from .base import ObjectInfo, Store

_TEMP_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
               "ServiceUnavailable", "503", "500", "502", "504", "RequestTimeTooSkewed"}
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
        cfg = Config(retries={"max_attempts": 1, "mode": "standard"},
                     connect_timeout=config.S3_CONNECT_TIMEOUT, read_timeout=config.S3_READ_TIMEOUT,
                     max_pool_connections=max_connections, s3={"addressing_style": "path"})
        self._local = threading.local()
        self._session = boto3.session.Session()
        self._cfg = cfg
        self._client_lock = threading.Lock()
        self._client = self._session.client("s3", endpoint_url=endpoint_url, config=cfg)

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
            if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
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
        return self._call(key, get)

    def _put(self, key: str, data: bytes | memoryview) -> None:
        body = bytes(data) if isinstance(data, memoryview) else data
        self._call(key, lambda: self.client.put_object(Bucket=self.bucket, Key=self.prefix + key,
                                                       Body=body))

    def _head(self, key: str) -> ObjectInfo | None:
        try:
            r = self._call(key, lambda: self.client.head_object(Bucket=self.bucket,
                                                                Key=self.prefix + key))
        except ObjectNotFound:
            return None
        return ObjectInfo(key, r["ContentLength"], r["LastModified"].timestamp())

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix)
        it = iter(pages)
        while True:
            page = self.retry(lambda: self._call(prefix, lambda: next(it, None)), "list")
            if page is None:
                return
            for obj in page.get("Contents", []):
                yield ObjectInfo(obj["Key"][len(self.prefix):], obj["Size"],
                                 obj["LastModified"].timestamp())

    def _touch(self, key: str) -> None:
        # A server-side copy onto itself renews LastModified without moving the bytes.
        self._call(key, lambda: self.client.copy_object(
            Bucket=self.bucket, Key=self.prefix + key, MetadataDirective="REPLACE",
            CopySource={"Bucket": self.bucket, "Key": self.prefix + key}))

    def _delete(self, key: str) -> None:
        self._call(key, lambda: self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key))
