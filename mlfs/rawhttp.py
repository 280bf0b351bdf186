"""Plain-``http://`` GETs whose bodies are read with one ``recv(MSG_WAITALL)`` each.

The mount's cold reads are GETs of 1–4 MiB objects.  Read through ``http.client`` (urllib3), a
body arrives in one ``recv`` per few dozen KiB — every one a trip through the interpreter and a
hand-over of the GIL among a stream's dozen fetch threads.  Here, once the headers are parsed,
the body goes into a buffer of its ``Content-Length`` with ``recv_into(..., MSG_WAITALL)``: the
kernel fills it as segments arrive and the thread returns to Python once per object
(docs/adr/0020 has the CPU it saves).

This is the path only for what it can do exactly: ``http://`` (an ``ssl`` socket takes no
``MSG_WAITALL``), no proxy, responses with a ``Content-Length`` or chunked bodies, HTTP/1.1
keep-alive.  Redirects are not followed here: a 3xx is returned to the caller like any status.  The
caller checks statuses and verifies bodies; responses are untrusted, so sizes are bounded and a
malformed response is a ``ConnectionError`` (temporary: the caller retries on a new connection).

Timeouts: the socket is blocking with ``SO_RCVTIMEO``/``SO_SNDTIMEO`` set, so a peer that sends
nothing for *read_timeout* seconds ends the call; a body still arriving, however slowly, does not.
"""

from __future__ import annotations

import select
import socket
import struct
import threading

from urllib.parse import urlsplit

from . import config
from .buffers import unfilled

MAX_HEAD = 64 << 10  # status line + headers


class TooLarge(ConnectionError):
    """The response announced, or sent, a body longer than the caller's *max_body*."""


class Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers  # names lower-cased
        self.body = body


class RawHttp:
    """A small pool of keep-alive connections to one ``host:port``."""

    def __init__(self, host: str, port: int, *, connect_timeout: float, read_timeout: float,
                 max_idle: int = 32) -> None:
        self.host, self.port = host, port
        self.host_header = host if port == 80 else f"{host}:{port}"
        if ":" in host and not host.startswith("["):
            self.host_header = f"[{host}]" if port == 80 else f"[{host}]:{port}"
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()

    @classmethod
    def for_url(cls, url: str, max_idle: int) -> RawHttp:
        """A pool for the host of *url* (``http://``), with mlfs's connect and read timeouts."""
        parts = urlsplit(url)
        return cls(parts.hostname or "", parts.port or 80,
                   connect_timeout=config.S3_CONNECT_TIMEOUT,
                   read_timeout=config.S3_READ_TIMEOUT, max_idle=max_idle)

    def serves(self, url: str) -> bool:
        """Whether *url* is plain http on this pool's host and port."""
        parts = urlsplit(url)
        return parts.scheme == "http" and parts.hostname == self.host \
            and (parts.port or 80) == self.port

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for s in idle:
            s.close()

    # -- connections ------------------------------------------------------------------------------
    def _connect(self) -> socket.socket:
        s = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        try:
            s.settimeout(None)  # blocking: MSG_WAITALL waits in the kernel; SO_RCVTIMEO bounds it
            tv = struct.pack("ll", int(self.read_timeout), int(self.read_timeout % 1 * 1e6))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            s.close()
            raise
        return s

    def _take(self) -> tuple[socket.socket, bool]:
        while True:
            with self._lock:
                s = self._idle.pop() if self._idle else None
            if s is None:
                return self._connect(), False
            # An idle keep-alive connection that is readable was closed by the server (or sent
            # something unasked): drop it.
            try:
                poller = select.poll()
                poller.register(s, select.POLLIN)
                readable = bool(poller.poll(0))
            except (OSError, ValueError):
                readable = True
            if not readable:
                return s, True
            s.close()

    def _give(self, s: socket.socket) -> None:
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(s)
                return
        s.close()

    # -- requests ---------------------------------------------------------------------------------
    def request(self, method: str, url: str, headers: dict[str, str], *,
                max_body: int) -> Response:
        """Send *method* for *url* (on this pool's host; its path and query are sent) and read
        the response.

        A body longer than *max_body* raises :class:`TooLarge` before it is read.  A reused
        connection that fails before a byte of the response is retried once on a new one (the
        server may have closed it between the check and the send)."""
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = [f"{method} {target} HTTP/1.1", f"Host: {self.host_header}"]
        head += [f"{k}: {v}" for k, v in headers.items() if k.lower() != "host"]
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        for attempt in (0, 1):
            s, reused = self._take()
            fresh = not reused or attempt == 1
            try:
                try:
                    s.sendall(data)
                except (BrokenPipeError, ConnectionResetError):
                    if fresh:
                        raise
                    raise _Stale() from None
                resp, keep = _read_response(s, method, max_body, fresh)
            except _Stale:
                s.close()
                continue
            except BaseException:
                s.close()
                raise
            if keep:
                self._give(s)
            else:
                s.close()
            return resp
        raise ConnectionError("the server closed two connections without answering")


def _digits(text: str) -> bool:
    """ASCII digits only (``str.isdigit`` also takes "²", which ``int`` refuses)."""
    return text.isascii() and text.isdigit()


class _Stale(Exception):
    """A reused connection was closed before any response byte."""


def _recv(s: socket.socket, n: int, what: str) -> bytes:
    """Up to *n* bytes, b"" at the end of the stream; TimeoutError when nothing came within the
    read timeout (``SO_RCVTIMEO`` makes a blocking ``recv`` fail with EAGAIN)."""
    try:
        return s.recv(n)
    except BlockingIOError:
        raise TimeoutError(f"{what} stalled") from None


def _recv_head(s: socket.socket, fresh: bool) -> tuple[bytes, bytearray]:
    buf = bytearray()
    while True:
        try:
            part = _recv(s, 16384, "response")
        except ConnectionResetError:
            if not buf and not fresh:
                raise _Stale() from None
            raise
        if not part:
            if not buf and not fresh:
                raise _Stale()
            raise ConnectionError("connection closed in the response's headers")
        buf += part
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            return bytes(buf[:end]), buf[end + 4:]
        if len(buf) > MAX_HEAD:
            raise ConnectionError("response headers longer than 64 KiB")


def _read_response(s: socket.socket, method: str, max_body: int,
                   fresh: bool) -> tuple[Response, bool]:
    raw, rest = _recv_head(s, fresh)
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not _digits(parts[1]) \
            or len(parts[1]) != 3:
        raise ConnectionError(f"not an HTTP/1.x response: {lines[0][:60]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ConnectionError(f"malformed response header {line[:60]!r}")
        name = name.lower()
        value = value.strip()
        if name in headers and name in ("content-length", "transfer-encoding"):
            if headers[name] != value:
                raise ConnectionError(f"conflicting {name} headers")
        headers[name] = value
    keep = parts[0] == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        if 100 <= status < 200:
            raise ConnectionError(f"unexpected interim response {status}")
        return Response(status, headers, b""), keep and not rest
    te = headers.get("transfer-encoding", "").lower()
    if te:
        if te != "chunked" or "content-length" in headers:
            raise ConnectionError(f"unsupported Transfer-Encoding {te[:40]!r}")
        body = _read_chunked(s, rest, max_body)
        return Response(status, headers, body), keep
    length = headers.get("content-length")
    if length is None:
        body = _read_to_close(s, rest, max_body)
        return Response(status, headers, body), False
    if not _digits(length) or len(length) > 15:
        raise ConnectionError(f"bad Content-Length {length[:20]!r}")
    n = int(length)
    if n > max_body:
        raise TooLarge(f"a body of {n} bytes, more than the {max_body} expected")
    if len(rest) > n:
        raise ConnectionError("more bytes than the Content-Length")
    return Response(status, headers, _read_exact(s, rest, n)), keep


def _read_exact(s: socket.socket, rest: bytearray, n: int) -> bytes:
    """*n* body bytes, *rest* of them already read: received straight into the ``bytes`` object
    returned (not zeroed first: mlfs.buffers), with no copy after the kernel's."""
    if n < (64 << 10):
        buf = bytearray(rest)
        while len(buf) < n:
            part = _recv(s, n - len(buf), f"body at {len(buf)} of {n} bytes")
            if not part:
                raise ConnectionError(f"connection closed at {len(buf)} of {n} body bytes")
            buf += part
        return bytes(buf)
    out, view, _ = unfilled(n)
    got = len(rest)
    view[:got] = rest
    try:
        while got < n:
            try:
                k = s.recv_into(view[got:], n - got, socket.MSG_WAITALL)
            except BlockingIOError:
                raise TimeoutError(f"body stalled at {got} of {n} bytes") from None
            if k == 0:
                raise ConnectionError(f"connection closed at {got} of {n} body bytes")
            got += k
    finally:
        view.release()
    return out


def _read_chunked(s: socket.socket, rest: bytearray, max_body: int) -> bytes:
    buf = bytearray(rest)
    out = bytearray()
    pos = 0

    def need(k: int) -> None:
        while len(buf) - pos < k:
            part = _recv(s, 65536, "chunked body")
            if not part:
                raise ConnectionError("connection closed in a chunked body")
            buf.extend(part)

    def line() -> bytes:
        nonlocal pos
        while True:
            end = buf.find(b"\r\n", pos)
            if end >= 0:
                out_line = bytes(buf[pos:end])
                pos = end + 2
                return out_line
            if len(buf) - pos > 4096:
                raise ConnectionError("chunk size line too long")
            need(len(buf) - pos + 1)

    while True:
        size_text = line().split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ConnectionError(f"bad chunk size {size_text[:20]!r}") from None
        if size < 0:
            raise ConnectionError("bad chunk size")
        if size == 0:
            while line():  # trailers, then the empty line
                pass
            return bytes(out)
        if len(out) + size > max_body:
            raise TooLarge(f"a chunked body of more than the {max_body} bytes expected")
        need(size + 2)
        out += buf[pos:pos + size]
        if buf[pos + size:pos + size + 2] != b"\r\n":
            raise ConnectionError("chunk not followed by CRLF")
        pos += size + 2
        if pos > 1 << 20:
            del buf[:pos]
            pos = 0


def _read_to_close(s: socket.socket, rest: bytearray, max_body: int) -> bytes:
    out = bytearray(rest)
    while True:
        part = _recv(s, 1 << 20, "body")
        if not part:
            return bytes(out)
        out += part
        if len(out) > max_body:
            raise TooLarge(f"a body of more than the {max_body} bytes expected")
