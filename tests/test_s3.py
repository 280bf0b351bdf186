"""The S3 store's direct GET path (docs/adr/0010) against a moto server over HTTP.

Faults on that path (resets, truncated and flipped bodies, 5xx, stalls, 403) are covered by
test_faults.py through the fault proxy; here: same bytes as boto3, the 404 mapping, and the hand-back
to boto3 for anything the direct path does not handle.
"""

from __future__ import annotations

import os
import time

import pytest

from conftest import make_bucket
from mlfs.errors import ObjectNotFound, StoreNotFound
from mlfs.stores import open_store
from mlfs.stores.s3 import NotDirect

KEYS = {"chunks/ab/empty": b"", "chunks/ab/one": b"x", "a key/with spaces+plus~tilde": b"odd name",
        "chunks/cd/big": os.urandom((5 << 20) + 3)}


@pytest.fixture(params=["raw", "urllib3"])
def s3(request, moto_server, monkeypatch):
    """The store, its direct path reading bodies with mlfs.rawhttp (plain http's default) or
    through urllib3 (https's path, and ``MLFS_RAW_HTTP=0``)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    store = open_store(f"s3://{make_bucket(moto_server)}/some prefix")
    assert store.direct is not None and store.direct.raw is not None
    if request.param == "urllib3":
        store.direct.raw = None
    for key, data in KEYS.items():
        store._put(key, data)
    return store


def counting(store):
    """The URLs the direct path sends requests to, from now on."""
    calls = []
    real = store.direct._send

    def send(method, url, key):
        calls.append(url)
        return real(method, url, key)

    store.direct._send = send
    return calls


def test_direct_get_returns_what_boto3_returns(s3):
    assert s3.direct is not None
    calls = counting(s3)
    for key, data in KEYS.items():
        assert s3._get(key) == data
    assert len(calls) == len(KEYS)  # every GET took the direct path
    boto = open_store(s3.url)
    boto.direct = None
    for key, data in KEYS.items():
        assert boto._get(key) == data


def test_missing_object_and_bucket_are_told_apart(s3, moto_server):
    with pytest.raises(ObjectNotFound, match="chunks/ef/nothing not found"):
        s3._get("chunks/ef/nothing")
    gone = open_store("s3://mlfs-no-such-bucket/x")
    assert gone.direct is not None
    with pytest.raises(StoreNotFound, match="does not exist"):
        gone._get("chunks/ab/one")


def test_a_response_the_direct_path_refuses_is_answered_by_boto3(s3, caplog):
    def refuse(full_key, key):
        raise NotDirect("HTTP 301 PermanentRedirect")  # e.g. a bucket in another region

    s3.direct.get = refuse
    sent = []
    s3.client.meta.events.register("before-send.s3.GetObject",
                                   lambda request, **kw: sent.append(dict(request.headers)))
    assert s3._get("chunks/cd/big") == KEYS["chunks/cd/big"]
    assert s3.direct is None and "using boto3 from now on" in caplog.text
    # boto3 does not ask for a CRC32 of the body: chunks are checked against their blake3 ids.
    assert sent and not any(k.lower() == "x-amz-checksum-mode" for k in sent[0])
    with pytest.raises(ObjectNotFound):
        s3._get("chunks/ef/nothing")


def test_direct_path_can_be_turned_off(moto_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    from mlfs import config

    monkeypatch.setattr(config, "S3_DIRECT", False)  # what MLFS_S3_DIRECT=0 sets
    assert open_store(f"s3://{make_bucket(moto_server)}").direct is None
    monkeypatch.setattr(config, "S3_DIRECT", True)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert open_store(f"s3://{make_bucket(moto_server)}").direct is None  # proxies: boto3's job


@pytest.mark.parametrize("code,status,kind", [("ExpiredToken", 400, "StorePermissionError"),
                                              ("InvalidArgument", 400, "StoreError"),
                                              ("MethodNotAllowed", 405, "StoreError")])
def test_every_error_of_the_s3_store_is_one_of_ours(s3, code, status, kind):
    """Unmapped botocore errors (an expired token, a 400) used to escape as ClientError and end
    background tasks of a mount; now each is an MlfsError naming the operation."""
    import botocore.exceptions as bx

    from mlfs import errors

    def refuse(**kw):
        raise bx.ClientError({"Error": {"Code": code, "Message": "no"},
                              "ResponseMetadata": {"HTTPStatusCode": status}}, "ListObjectsV2")
    s3.client.list_objects_v2 = refuse
    s3.client.head_object = refuse
    s3.direct = None  # HEADs take the direct path where they can: here boto3's errors are tested
    with pytest.raises(errors.MlfsError) as e:
        list(s3.list_manifests())
    assert type(e.value).__name__ == kind
    with pytest.raises(getattr(errors, kind)):
        s3.has_manifest("m", "v1")


def test_a_chunk_is_looked_up_with_one_signed_head(s3):
    """A checked switch asks the store for each chunk it will fetch: from the mount, without
    boto3, and with boto3's answers."""
    import blake3

    data = b"x" * 1000
    cid = blake3.blake3(data).hexdigest()
    s3.put_chunk(cid, data)
    calls = counting(s3)
    info = s3.head_chunk(cid)
    assert info is not None and info.size == len(data) and abs(info.mtime - time.time()) < 3600
    assert s3.has_chunk("0" * 64) is False
    assert len(calls) == 2
    direct, s3.direct = s3.direct, None
    try:
        assert s3.head_chunk(cid) == info  # boto3's answer, the same
    finally:
        s3.direct = direct


def test_checking_the_store_takes_the_direct_path(s3, moto_server, monkeypatch):
    calls = counting(s3)
    s3.check()
    assert len(calls) == 1  # one signed HEAD of the bucket, no boto3 call
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    missing = open_store("s3://no-such-bucket-mlfs/x")
    with pytest.raises(StoreNotFound):
        missing.check()


@pytest.mark.parametrize("url,token", [
    ("http://127.0.0.1:4569/bucket/chunks/ab/a%20key~x+y", None),
    ("https://s3.eu-west-1.amazonaws.com/bucket/k", "session/token+="),
    ("http://host:80/bucket", None),
])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_sigv4_matches_botocore(url, token, method):
    """The mount signs its GETs without botocore (docs/adr/0018); the headers must be exactly
    botocore's for the same request and time."""
    import datetime
    from unittest import mock

    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from mlfs.stores.sigv4 import Signer

    when = datetime.datetime(2026, 11, 23, 23, 59, 58)
    request = AWSRequest(method=method, url=url)
    with mock.patch("botocore.auth.get_current_datetime", return_value=when):
        S3SigV4Auth(Credentials("AKID", "secret/key", token), "s3", "eu-west-1").add_auth(request)
    ours = Signer("AKID", "secret/key", "eu-west-1", token=token).headers(
        method, url, now=when.replace(tzinfo=datetime.timezone.utc).timestamp())
    theirs = dict(request.headers.items())
    assert ours == {k: theirs[k] for k in ours}
    assert set(theirs) == set(ours)


def _run(code: str, env: dict) -> str:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


CHECK_AND_GET = ("import sys; from mlfs.stores import open_store; s = open_store({url!r}); "
                 "s.check(); assert s._get('k') == b'v'; "
                 "print('boto3' in sys.modules, 'urllib3' in sys.modules)")


def test_a_mount_environment_needs_no_boto3(moto_server, tmp_path):
    """With the endpoint, region and keys in the environment, checking the store and GETs import
    no boto3 (a mount starts ~0.25 s sooner); without keys there, boto3's chain is asked and works
    (here: a shared credentials file)."""
    bucket = make_bucket(moto_server)
    store = open_store(f"s3://{bucket}", endpoint_url=moto_server)
    store._put("k", b"v")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=moto_server, AWS_DEFAULT_REGION="us-east-1",
               AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    # Nor urllib3 over plain http (mlfs.rawhttp): ~100 fewer modules to load.
    assert _run(CHECK_AND_GET.format(url=f"s3://{bucket}"), env) == "False False"
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(creds), AWS_CONFIG_FILE=str(tmp_path / "none"))
    assert _run(CHECK_AND_GET.format(url=f"s3://{bucket}"), env) == "True True"
