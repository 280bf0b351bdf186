"""A fault-injecting HTTP proxy to put between an S3 client and an S3 server (tests and the soak).

    python -m mlfs.faultproxy --upstream http://127.0.0.1:9000 --port 9100 --rate 0.25

Each request is forwarded, or — with probability ``rate`` — hit by one fault drawn from ``kinds``:

- ``error``: a 500 InternalError or 503 SlowDown reply, the request never reaches the server;
- ``reset``: the connection is closed without a reply;
- ``truncate``: the reply announces its full length but only half the body is sent;
- ``stall``: the reply is delayed by ``stall`` seconds (longer than the client's read timeout);
- ``flip``: one byte of the reply body is flipped (bodies of GETs only).

``down = True`` resets every connection (the store is down); ``forbid = True`` answers every request
with 403 AccessDenied (a permanent error).  Faults touch responses only: a request body is always
forwarded intact (S3 checks uploads with checksums; the proxy models the network, not a broken server).
"""

from __future__ import annotations

import argparse
import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

KINDS = ("error", "reset", "truncate", "stall", "flip")


class FaultProxy:
    def __init__(self, upstream: str, *, rate: float = 0.0, kinds: tuple[str, ...] = KINDS,
                 stall: float = 3.0, latency: float = 0.0, seed: int = 0, port: int = 0) -> None:
        u = urlparse(upstream)
        self.upstream = (u.hostname, u.port or 80)
        self.rate = rate
        self.kinds = kinds
        self.stall = stall
        self.latency = latency
        self.down = False
        self.forbid = False
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                proxy._handle(self)
            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # resets are the point: stay quiet
                pass

        self.server = Server(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _draw(self) -> str | None:
        with self._lock:
            self.counts["requests"] += 1
            if self._rng.random() < self.rate:
                kind = self._rng.choice(self.kinds)
                self.counts[kind] += 1
                self.counts["faults"] += 1
                return kind
        return None

    def _reset(self, h: BaseHTTPRequestHandler) -> None:
        h.close_connection = True
        try:
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()
        except OSError:
            pass

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        if self.latency:
            time.sleep(self.latency)
        if self.down:
            with self._lock:
                self.counts["refused_down"] += 1
            return self._reset(h)
        if self.forbid:
            return self._reply(h, 403, b"<Error><Code>AccessDenied</Code><Message>denied</Message></Error>")
        fault = self._draw()
        if fault == "error":
            code, name = self._rng.choice([(500, "InternalError"), (503, "SlowDown")])
            return self._reply(h, code, f"<Error><Code>{name}</Code><Message>injected</Message></Error>".encode())
        if fault == "reset":
            return self._reset(h)
        if fault == "stall":
            time.sleep(self.stall)
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in ("connection",)}
            conn.request(h.command, h.path, body=body if h.command in ("PUT", "POST") else None,
                         headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            status, rheaders = resp.status, resp.getheaders()
        except OSError:
            return self._reset(h)
        finally:
            conn.close()
        if fault == "flip" and h.command == "GET" and data:
            pos = self._rng.randrange(len(data))
            data = data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1:]
        h.send_response(status)
        for k, v in rheaders:
            if k.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command == "HEAD":
            return
        if fault == "truncate" and len(data) > 1:
            h.wfile.write(data[:len(data) // 2])
            h.wfile.flush()
            return self._reset(h)
        h.wfile.write(data)

    def _reply(self, h: BaseHTTPRequestHandler, code: int, body: bytes) -> None:
        h.send_response(code)
        h.send_header("Content-Type", "application/xml")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--rate", type=float, default=0.2)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--stall", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    p = FaultProxy(args.upstream, rate=args.rate, kinds=tuple(args.kinds.split(",")), stall=args.stall,
                   seed=args.seed, port=args.port).start()
    print(p.url, flush=True)
    try:
        while True:
            time.sleep(10)
            print(dict(p.counts), flush=True)
    except KeyboardInterrupt:
        p.stop()


if __name__ == "__main__":
    main()
