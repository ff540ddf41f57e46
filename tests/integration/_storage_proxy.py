"""A small loopback HTTP proxy that injects failures in front of a storage server.

``FlakyProxy(upstream, fail_first=N, mode=...)`` listens on 127.0.0.1 (a free port) and
forwards every request to ``upstream`` (the moto server or the GCS emulator), except that it
answers the first ``fail_first`` requests itself:

- ``mode="503"``: ``503 Service Unavailable`` with an S3-style XML body;
- ``mode="403"``: ``403 Forbidden``;
- ``mode="reset"``: the TCP connection is reset (``SO_LINGER`` 0, then close) without a reply.

``fail_first=None`` fails every request; ``fail_next(n)`` re-arms it. It is a context manager: it serves only inside the
``with`` block and in any case stops itself after ``max_lifetime_s``.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailers", "transfer-encoding", "upgrade",
}


class FlakyProxy:
    """A forwarding proxy that fails the first requests it sees (see the module docstring)."""

    def __init__(
        self,
        upstream: str,
        *,
        fail_first: int | None = 2,
        mode: str = "503",
        max_lifetime_s: float = 60.0,
    ):
        if mode not in ("503", "403", "reset"):
            raise ValueError(f"mode: expected '503', '403' or 'reset', got {mode!r}")
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream_host = parsed.hostname or "127.0.0.1"
        self.upstream_port = parsed.port or 80
        self.fail_first = fail_first
        self.mode = mode
        self.max_lifetime_s = max_lifetime_s
        self.requests = 0  # all requests received
        self.failed = 0  # requests answered with the injected failure
        self.forwarded = 0  # requests passed to the upstream server
        self.log: list[str] = []  # "METHOD path -> outcome", in order
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        assert self.port is not None, "proxy not started"
        return f"http://127.0.0.1:{self.port}"

    def fail_next(self, n: int) -> None:
        """Answer the next ``n`` requests with the injected failure (then forward again)."""
        with self._lock:
            self.fail_first = self.failed + n

    def _should_fail(self, line: str) -> bool:
        with self._lock:
            self.requests += 1
            fail = self.fail_first is None or self.failed < self.fail_first
            if fail:
                self.failed += 1
            else:
                self.forwarded += 1
            self.log.append(f"{line} -> {'injected ' + self.mode if fail else 'forwarded'}")
            return fail

    def __enter__(self) -> FlakyProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # noqa: A002 - quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        length = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if length == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(length))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                if proxy._should_fail(f"{self.command} {self.path}"):
                    self._fail()
                    return
                self._forward(body)

            def _fail(self) -> None:
                if proxy.mode == "reset":
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.close_connection = True
                    self.connection.close()
                    return
                status, code = (503, "ServiceUnavailable") if proxy.mode == "503" else (403, "AccessDenied")
                payload = (
                    f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                    f"<Message>injected by the test proxy (try later)</Message></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _forward(self, body: bytes) -> None:
                conn = http.client.HTTPConnection(
                    proxy.upstream_host, proxy.upstream_port, timeout=30
                )
                try:
                    headers = {
                        k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP
                    }
                    if body or "Content-Length" in self.headers:
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                            self.send_header(k, v)
                    if self.command == "HEAD":
                        length = resp.getheader("Content-Length")
                        if length is not None:
                            self.send_header("Content-Length", length)
                    else:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        self._timer = threading.Timer(self.max_lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._timer is not None:
            self._timer.cancel()

    def __exit__(self, *exc) -> None:
        self.stop()
