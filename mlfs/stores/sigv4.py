"""AWS Signature Version 4 for the S3 requests a mount makes (GET and HEAD without a body).

A mount's data plane is whole-object GETs (docs/adr/0010); signing them needs an HMAC chain and
two SHA-256s, not botocore.  Importing boto3 and building its client cost ~0.25 s of a mount's
start (docs/adr/0018), so when the environment names the endpoint, the region and the keys, the
mount signs with this and imports boto3 only if something else is needed (a listing, a PUT, a
response the direct path does not handle).

The result is byte-for-byte what botocore's ``S3SigV4Auth`` produces for the same request and
time (``tests/test_s3.py::test_sigv4_matches_botocore``).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import urlsplit

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
ALGORITHM = "AWS4-HMAC-SHA256"


class Signer:
    """Signs requests with one set of static credentials for one region and service."""

    def __init__(self, access_key: str, secret_key: str, region: str, *,
                 token: str | None = None, service: str = "s3") -> None:
        self.access_key = access_key
        self.secret_key = secret_key
        self.token = token
        self.region = region
        self.service = service
        self._keys: dict[str, bytes] = {}  # date → signing key (one HMAC chain per day)

    def _key(self, date: str) -> bytes:
        key = self._keys.get(date)
        if key is None:
            k = ("AWS4" + self.secret_key).encode()
            for part in (date, self.region, self.service, "aws4_request"):
                k = hmac.new(k, part.encode(), hashlib.sha256).digest()
            self._keys = {date: k}
            key = k
        return key

    def headers(self, method: str, url: str, *, now: float | None = None) -> dict[str, str]:
        """The headers that sign a body-less *method* request of *url* (path already
        percent-encoded as it will be sent; no query string)."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:  # an IPv6 literal
            host = f"[{host}]"
        default = {"http": 80, "https": 443}.get(parts.scheme)
        if parts.port is not None and parts.port != default:
            host = f"{host}:{parts.port}"
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
        date = stamp[:8]
        signed = {"host": host, "x-amz-content-sha256": EMPTY_SHA256, "x-amz-date": stamp}
        if self.token:
            signed["x-amz-security-token"] = self.token
        names = sorted(signed)
        canonical = "\n".join([
            method, parts.path or "/", parts.query,
            "".join(f"{n}:{signed[n]}\n" for n in names), ";".join(names), EMPTY_SHA256])
        scope = f"{date}/{self.region}/{self.service}/aws4_request"
        to_sign = "\n".join([ALGORITHM, stamp, scope,
                             hashlib.sha256(canonical.encode()).hexdigest()])
        signature = hmac.new(self._key(date), to_sign.encode(), hashlib.sha256).hexdigest()
        out = {"X-Amz-Date": stamp, "X-Amz-Content-SHA256": EMPTY_SHA256,
               "Authorization": (f"{ALGORITHM} Credential={self.access_key}/{scope}, "
                                 f"SignedHeaders={';'.join(names)}, Signature={signature}")}
        if self.token:
            out["X-Amz-Security-Token"] = self.token
        return out
