"""HTTP stores and the edge (issue 14), with real parts: nginx (Debian) serving a store statically
and as a caching proxy in front of `mlfs serve`, whose origin is S3 on the moto server; a fault
proxy between them; hostile requests against `mlfs serve`; fleet rollout by alias with --on-switch."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import (MLFS, free_port, generate_into, make_bucket, require, run_mlfs, sha,
                      wait_for, wait_port)
from mlfs import catalog
from mlfs import index as ix
from mlfs.generate import generate
from mlfs.stores import open_store


class Nginx:
    """nginx in the foreground with a config of our own, on a free port."""

    def __init__(self, work: Path, server_body: str, http_extra: str = "") -> None:
        exe = shutil.which("nginx") or "/usr/sbin/nginx"
        require(os.path.exists(exe), "nginx is not installed (Debian: nginx-light)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        work.mkdir(parents=True, exist_ok=True)
        (work / "tmp").mkdir(exist_ok=True)
        conf = work / "nginx.conf"
        conf.write_text(f"""
worker_processes 1;
daemon off;
{"user root root;" if os.geteuid() == 0 else ""}  # the test's files are root's, mode 0700
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 512; }}
http {{
  access_log {work}/access.log;
  client_body_temp_path {work}/tmp/body;
  proxy_temp_path {work}/tmp/proxy;
  fastcgi_temp_path {work}/tmp/fastcgi;
  uwsgi_temp_path {work}/tmp/uwsgi;
  scgi_temp_path {work}/tmp/scgi;
  {http_extra}
  server {{
    listen 127.0.0.1:{self.port};
    {server_body}
  }}
}}
""")
        self.work = work
        self.proc = subprocess.Popen([exe, "-c", str(conf), "-p", str(work)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_port(self.port, self.proc)

    def access_log(self, lines: int = 0) -> list[str]:
        """The access log, once it has at least *lines* lines: nginx writes a request's line
        after the response has gone, so a client may read the log before it is there."""
        log = self.work / "access.log"
        wait_for(lambda: len(log.read_text().splitlines()) >= lines, 10, f"{lines} log lines")
        return log.read_text().splitlines()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Serve:
    """`mlfs serve STORE` in a subprocess."""

    def __init__(self, store_url: str, cache: Path, env=None, ttl: str = "1") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = cache.parent / f"serve-{self.port}.log"
        self.logf = open(self.log, "w")
        self.proc = subprocess.Popen([*MLFS, "serve", store_url, "--listen", f"127.0.0.1:{self.port}",
                                      "--cache-dir", str(cache), "--ttl", ttl, "--access-log"],
                                     stdout=self.logf, stderr=subprocess.STDOUT, env=env)
        wait_port(self.port, self.proc)

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in get(self.port, "/metrics")[2].decode().splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)
        self.logf.close()
        assert "Traceback" not in self.log.read_text() and "internal error" not in self.log.read_text()


def get(port: int, path: str, method: str = "GET", headers=None) -> tuple[int, dict, bytes]:
    """A raw request: the path goes out exactly as given (no client-side normalisation)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.putrequest(method, path, skip_accept_encoding=True)
    for k, v in (headers or {}).items():
        c.putheader(k, v)
    c.endheaders()
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, dict(r.getheaders()), body


@pytest.fixture
def published(tmp_path, family):
    """A local store with minilm v1 and v2 and the alias stable -> v1."""
    store = open_store(str(tmp_path / "store"), create=True)
    generate(family["v1"], store, "minilm", "v1")
    generate(family["v2"], store, "minilm", "v2")
    catalog.set_alias(store, "minilm", "stable", "v1")
    return store


# -- the index -----------------------------------------------------------------------------------
def test_generate_rm_and_alias_keep_the_index_current(published, family):
    def index():
        return ix.loads(published.get_index_bytes())
    idx = index()
    assert {(v["id"], v["version"]) for v in idx.versions} == {("minilm", "v1"), ("minilm", "v2")}
    assert idx.aliases == [{"id": "minilm", "alias": "stable", "version": "v1"}]
    v2 = next(v for v in idx.versions if v["version"] == "v2")
    assert v2["digest"].startswith("blake3:") and v2["logical_bytes"] > 0
    catalog.set_alias(published, "minilm", "stable", "v2")
    assert index().aliases[0]["version"] == "v2"
    catalog.remove(published, "minilm", "v2")
    idx = index()
    assert {v["version"] for v in idx.versions} == {"v1"} and idx.aliases == []
    (published.root / "index.json").unlink()
    run_mlfs("index", published.root)
    assert {v["version"] for v in index().versions} == {"v1"}


# -- (a) nginx serving a store directory statically ----------------------------------------------
def test_static_nginx_store_mounts_byte_exact_and_lists(published, family, mounter, tmp_path):
    web = Nginx(tmp_path / "nginx", f"root {published.root}; location / {{ try_files $uri =404; }}")
    try:
        out = run_mlfs("ls", web.url, "--json").stdout
        listed = json.loads(out)
        assert [v["version"] for v in listed["versions"]] == ["v1", "v2"]
        assert listed["versions"][0]["aliases"] == ["stable"]
        mnt = mounter("--store", web.url, "--id", "minilm", "--version", "v2",
                      "--cache-dir", tmp_path / "c")
        for rel in ("model.safetensors", "config.json", "tokenizer.json"):
            assert sha(mnt.mountpoint / rel) == sha(family["v2"] / rel), rel
        cat = mounter("--store", web.url, "--cache-dir", tmp_path / "c2", name="cat")
        assert sorted(os.listdir(cat.mountpoint / "minilm")) == ["stable", "v1", "v2"]
        assert sha(cat.mountpoint / "minilm" / "stable" / "model.safetensors") == \
            sha(family["v1"] / "model.safetensors")
        for cmd in (["rm", web.url, "minilm@v1"], ["gc", web.url],
                    ["generate", family["v1"], "--store", web.url, "--id", "x", "--version", "1"]):
            p = run_mlfs(*cmd, check=False)
            assert p.returncode == 1 and "read-only" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    finally:
        web.stop()


def test_a_compressed_answer_is_asked_again_through_urllib3(published, tmp_path):
    """Plain-http bodies are read by mlfs.rawhttp, which asks for no encoding; a body encoded
    anyway (a misconfigured server) is asked again through urllib3, which decodes it."""
    web = Nginx(tmp_path / "nginx", f"""
    root {published.root};
    location / {{ gzip on; gzip_types *; gzip_min_length 1; try_files $uri =404; }}""")
    try:
        store = open_store(web.url)
        assert store.raw is not None
        raw_request = store.raw.request

        def gzip_anyway(method, target, headers, **kw):
            return raw_request(method, target, {**headers, "Accept-Encoding": "gzip"}, **kw)
        store.raw.request = gzip_anyway
        assert store.get_manifest_bytes("minilm", "v1") == \
            published.get_manifest_bytes("minilm", "v1")
        assert [line.split('"')[1] for line in web.access_log(2)] == \
            ["GET /manifests/minilm/v1.json HTTP/1.1"] * 2  # raw, then urllib3
    finally:
        web.stop()


def test_redirects_are_followed_and_the_token_stays_with_the_store(published, tmp_path,
                                                                    monkeypatch):
    """A store that redirects (a CDN handing out signed URLs) is followed, up to 5 hops; the
    MLFS_HTTP_HEADER token goes to the store's own origin only; a loop or a redirect off http(s)
    is a one-line StoreError."""
    from mlfs import config
    from mlfs.errors import StoreError

    monkeypatch.setattr(config, "HTTP_HEADER", "X-Mlfs-Token: secret")
    tok = "log_format tok '$request_uri token=$http_x_mlfs_token';"
    blobs = Nginx(tmp_path / "blobs", f"root {published.root}; access_log {tmp_path}/blobs.log tok;"
                  "location / { try_files $uri =404; }", http_extra=tok)
    front = Nginx(tmp_path / "front", f"""access_log {tmp_path}/front.log tok;
    location /loop/ {{ return 302 /loop/again; }}
    location /ftp/ {{ return 302 ftp://example.invalid/x; }}
    location /here/ {{ rewrite ^/here/(.*)$ /there/$1 redirect; }}
    location ~ ^/there/(.*)$ {{ return 307 {blobs.url}/$1; }}""", http_extra=tok)
    try:
        store = open_store(front.url + "/here")
        m = store.load_manifest("minilm", "v1")
        f = m.files[0]
        assert store.get_chunk_verified(f.chunk_ids[0], f.chunk_sizes[0])
        front_log = (tmp_path / "front.log").read_text().splitlines()
        blobs_log = (tmp_path / "blobs.log").read_text().splitlines()
        assert front_log and all(line.endswith("token=secret") for line in front_log)
        assert blobs_log and all(line.endswith("token=-") for line in blobs_log)  # none
        for prefix, message in (("/loop", "more than 5 redirects"),
                                ("/ftp", r"not an http\(s\) URL")):
            with pytest.raises(StoreError, match=message):
                open_store(front.url + prefix).get_manifest_bytes("minilm", "v1")
    finally:
        front.stop()
        blobs.stop()


def test_http_store_without_an_index_says_so(tmp_path, family):
    store = open_store(str(tmp_path / "store"), create=True)
    generate(family["v1"], store, "minilm", "v1")
    (store.root / "index.json").unlink()
    web = Nginx(tmp_path / "nginx", f"root {store.root}; location / {{ try_files $uri =404; }}")
    try:
        p = run_mlfs("ls", web.url, check=False)
        assert p.returncode == 1 and "no index.json" in p.stderr and p.stderr.count("\n") == 1
        # Reading a version by name needs no index.
        run_mlfs("inspect", "minilm@v1", "--store", web.url)
    finally:
        web.stop()


# -- (b) nginx proxy_cache in front of mlfs serve in front of S3 -----------------------------------
def test_nginx_cache_in_front_of_mlfs_serve_over_s3(moto_server, family, mounter, tmp_path):
    bucket = make_bucket(moto_server)
    env = {**os.environ, "AWS_ENDPOINT_URL": moto_server}
    os.environ["AWS_ENDPOINT_URL"] = moto_server
    try:
        origin = open_store(f"s3://{bucket}/models")
        generate(family["v1"], origin, "minilm", "v1")
    finally:
        os.environ.pop("AWS_ENDPOINT_URL")
    edge = Serve(f"s3://{bucket}/models", tmp_path / "edge-cache", env=env)
    web = Nginx(tmp_path / "nginx",
                f"""location / {{
                      proxy_pass {edge.url};
                      proxy_http_version 1.1;
                      proxy_set_header Connection "";
                      proxy_cache mlfs;
                      proxy_cache_lock on;
                      add_header X-Cache-Status $upstream_cache_status;
                    }}""",
                http_extra=f"proxy_cache_path {tmp_path}/nginx/cache levels=1:2 keys_zone=mlfs:10m "
                           "max_size=2g inactive=1d use_temp_path=off;")
    try:
        first = mounter("--store", web.url, "--id", "minilm", "--version", "v1",
                        "--cache-dir", tmp_path / "cache-n1", name="n1")
        assert sha(first.mountpoint / "model.safetensors") == sha(family["v1"] / "model.safetensors")
        fetched = edge.metrics()["mlfs_serve_chunks_fetched_total"]
        served = sum(v for k, v in edge.metrics().items() if k.startswith("mlfs_serve_requests_total"))
        assert fetched > 0
        second = mounter("--store", web.url, "--id", "minilm", "--version", "v1",
                         "--cache-dir", tmp_path / "cache-n2", name="n2")
        assert sha(second.mountpoint / "model.safetensors") == sha(family["v1"] / "model.safetensors")
        m = edge.metrics()
        assert m["mlfs_serve_chunks_fetched_total"] == fetched  # nothing more from the origin
        # Every chunk of the second mount came out of nginx's cache, not the edge.
        chunk_requests = sum(v for k, v in m.items()
                             if k.startswith('mlfs_serve_requests_total{route="chunk"'))
        assert sum(v for k, v in m.items() if k.startswith("mlfs_serve_requests_total")) - served \
            <= 3  # index/manifest revalidations at most
        status, headers, _ = get(web.port, "/chunks/" + first_chunk(origin_store=None, port=edge.port))
        assert status == 200 and headers.get("X-Cache-Status") in ("HIT", "MISS")
        assert chunk_requests > 0
    finally:
        web.stop()
        edge.stop()


def first_chunk(origin_store, port: int) -> str:
    idx = json.loads(get(port, "/index.json")[2])
    v = idx["versions"][0]
    man = json.loads(get(port, f"/manifests/{v['id']}/{v['version']}.json")[2])
    cid = man["files"][0]["chunks"][0][0]
    return f"{cid[:2]}/{cid}"


# -- (c) a broken HTTP tier: corrupt, truncated, wrong-length bodies, 404, 500, stalls ------------
def test_faulty_http_tier_never_yields_wrong_bytes(published, family, mounter, tmp_path):
    from mlfs.faultproxy import FaultProxy

    web = Nginx(tmp_path / "nginx", f"root {published.root}; location / {{ try_files $uri =404; }}")
    try:
        with FaultProxy(web.url, rate=0.3, stall=2.0, seed=3) as proxy:
            env = {**os.environ, "MLFS_S3_READ_TIMEOUT": "1"}
            mnt = mounter("--store", proxy.url, "--id", "minilm", "--version", "v2",
                          "--cache-dir", tmp_path / "c", env=env)
            assert sha(mnt.mountpoint / "model.safetensors") == sha(family["v2"] / "model.safetensors")
            s = mnt.stats()
            assert s["retries"] + s["corrupt_chunks"] > 0 and sum(proxy.counts.values()) > 0
        # A chunk the server does not have (404): EIO for that read, the mount stays up.
        m = json.loads(published.get_manifest_bytes("minilm", "v1"))
        big = next(f for f in m["files"] if f["path"] == "model.safetensors")
        gone = big["chunks"][-1][0]
        published.delete_chunk(gone)
        lazy = mounter("--store", web.url, "--id", "minilm", "--version", "v1",
                       "--cache-dir", tmp_path / "c2", "--timeout", "5", name="lazy")
        with open(lazy.mountpoint / "model.safetensors", "rb") as f:
            f.seek(big["size"] - 10)
            with pytest.raises(OSError) as e:
                f.read(10)
        assert e.value.errno == 5
        assert (lazy.mountpoint / "config.json").read_bytes() == (family["v1"] / "config.json").read_bytes()
    finally:
        web.stop()


# -- (d) hostile requests against mlfs serve ---------------------------------------------------------
def test_hostile_requests_against_serve_read_nothing_outside_the_store(published, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-1234")
    edge = Serve(str(published.root), tmp_path / "edge-cache")
    try:
        cid = first_chunk(None, edge.port)
        bad = ["/chunks/../../secret.txt", "/chunks/ab/%2e%2e%2f%2e%2e%2fsecret.txt",
               "/manifests/../secret.txt", "/manifests/minilm/..%2fsecret.json",
               "/aliases/minilm/../../secret.txt", f"/chunks/00/{cid[3:]}", "/chunks/ab/xyz",
               "//secret.txt", "/./index.json", "/index.json/..", "/secret.txt", "/store/index.json",
               "/manifests/minilm/v1.json%00", "/chunks/" + "a" * 3000]
        for path in bad:
            status, _, body = get(edge.port, path)
            assert status in (400, 404), (path, status)
            assert b"TOP-SECRET" not in body
        assert get(edge.port, "/chunks/ff/" + "f" * 64)[0] == 404
        assert get(edge.port, "/manifests/minilm/v9.json")[0] == 404
        assert get(edge.port, "/index.json", method="POST")[0] == 405
        assert get(edge.port, "/index.json", method="DELETE")[0] == 405
        status, headers, body = get(edge.port, "/chunks/" + cid)
        assert status == 200 and headers["etag"] == f'"{cid[3:]}"'
        assert "immutable" in headers["cache-control"]
        import blake3

        assert blake3.blake3(body).hexdigest() == cid[3:]
        status, headers, part = get(edge.port, "/chunks/" + cid, headers={"Range": "bytes=5-14"})
        assert status == 206 and part == body[5:15]
        assert headers["content-range"] == f"bytes 5-14/{len(body)}"
        assert get(edge.port, "/chunks/" + cid, headers={"Range": f"bytes={len(body)}-"})[0] == 416
        assert get(edge.port, "/chunks/" + cid, headers={"If-None-Match": f'"{cid[3:]}"'})[0] == 304
        status, headers, _ = get(edge.port, "/manifests/minilm/v1.json")
        assert status == 200 and "max-age=1" in headers["cache-control"]
        assert get(edge.port, "/healthz")[0] == 200
        # A corrupt chunk in the origin is never served.
        chunk_file = published.root / "chunks" / cid
        data = chunk_file.read_bytes()
        other = first_chunk_of(published, skip=cid)
        (published.root / "chunks" / other).write_bytes(b"\0" + data[1:])
        assert get(edge.port, "/chunks/" + other)[0] == 502
    finally:
        edge.stop()


def first_chunk_of(store, skip: str) -> str:
    for cid, _ in store.list_chunks():
        if f"{cid[:2]}/{cid}" != skip:
            return f"{cid[:2]}/{cid}"
    raise AssertionError("no other chunk")


# -- fleet rollout: alias moves, mounts follow, --on-switch runs ---------------------------------
def test_catalog_mounts_follow_an_alias_and_run_on_switch(published, family, mounter, tmp_path):
    edge = Serve(str(published.root), tmp_path / "edge-cache", ttl="0.2")
    try:
        hook_out = tmp_path / "hook.txt"
        metrics = tmp_path / "metrics.prom"
        mnt = mounter("--store", edge.url, "--cache-dir", tmp_path / "c", "--poll", "0.3",
                      "--on-switch", f'echo "$MLFS_SWITCH_CHANGES" >> {hook_out}',
                      "--metrics-file", metrics)
        stable = mnt.mountpoint / "minilm" / "stable" / "model.safetensors"
        assert sha(stable) == sha(family["v1"] / "model.safetensors")
        catalog.set_alias(published, "minilm", "stable", "v2")
        wait_for(lambda: sha(stable) == sha(family["v2"] / "model.safetensors"), what="the alias move")
        wait_for(lambda: hook_out.exists() and "minilm/stable v1->v2" in hook_out.read_text(),
                 what="the --on-switch command")
        wait_for(lambda: mnt.stats().get("on_switch_runs", 0) >= 1, what="the hook's count")
        s = mnt.stats()
        assert s["on_switch_failures"] == 0 and s["last_on_switch"]["status"] == 0
        prom = run_mlfs("stats", "--prometheus", mnt.mountpoint).stdout
        assert "mlfs_bytes_served_total{" in prom and "mlfs_disk_hit_ratio{" in prom
        wait_for(lambda: metrics.exists() and "mlfs_bytes_fetched_total" in metrics.read_text(),
                 what="the metrics file")
    finally:
        edge.stop()


def test_a_failing_on_switch_command_is_counted(store, family, mounter, tmp_path):
    a = generate_into(store, family["v1"], "minilm", "v1", tmp_path)
    b = generate_into(store, family["v2"], "minilm", "v2", tmp_path)
    mnt = mounter("--manifest", a, "--cache-dir", tmp_path / "c", "--on-switch", "exit 3")
    run_mlfs("switch", mnt.mountpoint, b)
    wait_for(lambda: mnt.stats().get("on_switch_failures") == 1, what="the failed hook")
    assert mnt.stats()["last_on_switch"]["status"] == 3 and mnt.stats()["version"] == "v2"


def test_proxies_and_token_header_come_from_the_environment(monkeypatch):
    from mlfs import config
    from mlfs.errors import UsageError
    from mlfs.stores.http import HttpStore, _proxy_for

    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "edge.local")
    assert _proxy_for("http", "models.example") == "http://proxy.example:3128"
    assert _proxy_for("http", "edge.local") is None
    monkeypatch.setattr(config, "HTTP_HEADER", "Authorization: Bearer abc")
    s = HttpStore("http://models.example/prefix")
    assert s.headers["Authorization"] == "Bearer abc" and s.pool.proxy is not None
    monkeypatch.setattr(config, "HTTP_HEADER", "no colon here")
    with pytest.raises(UsageError):
        HttpStore("http://models.example/prefix")
    with pytest.raises(UsageError):
        HttpStore("http://models.example/prefix?x=1")
