"""mlfs.rawhttp against a scripted TCP server: what each response shape gives, and that a bad or
slow response is an error (never wrong bytes).  The S3 store's use of it against moto is in
test_s3.py, its faults through the fault proxy in test_faults.py."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from mlfs.rawhttp import RawHttp


class Scripted:
    """A server that answers each request on a connection with the next of *replies* (bytes, or a
    callable given the socket); counts connections and keeps the requests it read."""

    def __init__(self, replies: list) -> None:
        self.replies = list(replies)
        self.connections = 0
        self.requests: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            buf = b""
            while self.replies:
                while b"\r\n\r\n" not in buf:
                    part = conn.recv(65536)
                    if not part:
                        return
                    buf += part
                head, buf = buf.split(b"\r\n\r\n", 1)
                self.requests.append(head)
                reply = self.replies.pop(0)
                if callable(reply):
                    if reply(conn) is False:
                        return
                else:
                    conn.sendall(reply)

    def client(self, **kw) -> RawHttp:
        kw.setdefault("connect_timeout", 2)
        kw.setdefault("read_timeout", 2)
        return RawHttp("127.0.0.1", self.port, **kw)


def ok(body: bytes, extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def test_bodies_come_whole_and_connections_are_kept_alive():
    big = os.urandom((5 << 20) + 7)

    def trickle(conn):  # the body in uneven pieces, as a real link delivers it
        conn.sendall(ok(b"")[:-2].replace(b"Length: 0", f"Length: {len(big)}".encode()) + b"\r\n")
        for i in range(0, len(big), 100_003):
            conn.sendall(big[i:i + 100_003])

    srv = Scripted([ok(b"hello"), trickle, ok(b"", "X-A: b\r\n")])
    c = srv.client()
    r = c.request("GET", f"http://127.0.0.1:{srv.port}/b/k%20x?x-id=1", {"Authorization": "sig"},
                  max_body=1 << 30)
    assert (r.status, bytes(r.body)) == (200, b"hello")
    assert bytes(c.request("GET", "http://h/big", {}, max_body=1 << 30).body) == big
    r = c.request("HEAD", "http://h/k", {}, max_body=0)
    assert r.headers["x-a"] == "b" and r.body == b""
    assert srv.connections == 1
    assert srv.requests[0].startswith(b"GET /b/k%20x?x-id=1 HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nAuthorization: sig" in srv.requests[0]


def test_a_chunked_body_is_decoded():
    body = b"4\r\nWiki\r\n6;ext=1\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n0\r\nT: x\r\n\r\n"
    srv = Scripted([b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n" + body,
                    ok(b"next")])
    c = srv.client()
    r = c.request("GET", "http://h/", {}, max_body=100)
    assert (r.status, r.body) == (404, b"Wikipedia in \r\n\r\nchunks.")
    assert bytes(c.request("GET", "http://h/", {}, max_body=100).body) == b"next"
    assert srv.connections == 1


def test_connection_close_and_a_closed_idle_connection_mean_a_new_one():
    def answer_then_close(conn):
        conn.sendall(ok(b"one"))
        return False  # the server drops the kept-alive connection

    srv = Scripted([ok(b"zero", "Connection: close\r\n"), answer_then_close, ok(b"two")])
    c = srv.client()
    assert bytes(c.request("GET", "http://h/", {}, max_body=10).body) == b"zero"
    assert bytes(c.request("GET", "http://h/", {}, max_body=10).body) == b"one"
    time.sleep(0.1)
    assert bytes(c.request("GET", "http://h/", {}, max_body=10).body) == b"two"
    assert srv.connections == 3


@pytest.mark.parametrize("reply,message", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "closed at 5 of 10"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", "more than the 100"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n", "bad Content-Length"),  # a superscript 2
    (b"HTTP/1.1 2\xb2\xb2 OK\r\n\r\n", "not an HTTP/1.x response"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", "conflicting"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x response"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed response header"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported Transfer-Encoding"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n200\r\n" + b"x" * 512 + b"\r\n0\r\n\r\n",
     "more than the 100"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"y" * (70 << 10), "longer than 64 KiB"),
])
def test_a_bad_response_is_a_connection_error(reply, message):
    def send_and_close(conn):
        conn.sendall(reply)
        conn.shutdown(socket.SHUT_WR)
        time.sleep(0.2)
        return False

    c = Scripted([send_and_close]).client()
    with pytest.raises(ConnectionError, match=message):
        c.request("GET", "http://h/", {}, max_body=100)


def test_a_stalled_body_times_out():
    def stall(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        time.sleep(3)
        return False

    c = Scripted([stall]).client(read_timeout=0.5)
    t = time.monotonic()
    with pytest.raises(TimeoutError, match="body at 3 of 10 bytes stalled"):
        c.request("GET", "http://h/", {}, max_body=100)
    assert time.monotonic() - t < 2.5


def test_a_send_refused_on_a_reused_connection_is_retried_on_a_new_one(monkeypatch):
    """The server may close an idle connection between the check for that and the send: the
    send fails (here: a socket already shut for writing, EPIPE) and the request goes out again
    on a new connection, once."""
    srv = Scripted([ok(b"first"), ok(b"again")])
    c = srv.client()
    assert bytes(c.request("GET", "http://h/", {}, max_body=10).body) == b"first"
    dead = c._idle.pop()
    dead.shutdown(socket.SHUT_WR)
    real_take = c._take
    handed = []

    def take():
        if not handed:
            handed.append(dead)
            return dead, True
        return real_take()
    monkeypatch.setattr(c, "_take", take)
    assert bytes(c.request("GET", "http://h/", {}, max_body=10).body) == b"again"
    assert srv.connections == 2 and dead.fileno() == -1
