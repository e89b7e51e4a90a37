"""A small threaded HTTP server on 127.0.0.1 for fetch tests.

    with LocalImageServer(tmp_path) as server:
        server.redirect("/hop", server.url("/photo.jpg"))
        stall = server.stall("/slow.jpg", seconds=30, body=jpeg_bytes)
        server.slow_headers("/drip-head.jpg", jpeg_bytes, interval=0.2)  # headers at 5 bytes/s
        ...                                # fetch server.url("/slow.jpg") in a worker
        assert stall.arrived.wait(5)       # the request reached the server
        stall.release()                    # stop stalling: the response goes out now

Files under ``root`` are served at their relative path; routes registered with the
methods below take precedence. ``server.requests`` records ``(path, headers)`` of every
request. Leaving the ``with`` block (or calling ``stop()``) releases every stalled or
streaming handler and closes the socket.
"""

from __future__ import annotations

import mimetypes
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit


@dataclass
class StallRoute:
    """A route that waits before answering. ``arrived`` is set when a request comes in,
    ``hits`` counts them, ``release()`` stops the stalling (for current and later requests)."""

    seconds: float
    status: int = 200
    body: bytes = b""
    content_type: str = "application/octet-stream"
    before_headers: bool = True
    arrived: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    hits: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def release(self) -> None:
        self.released.set()

    def _hit(self) -> None:
        with self._lock:
            self.hits += 1
        self.arrived.set()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: LocalImageServer

    def handle_error(self, request: Any, client_address: Any) -> None:  # quiet on client hang-ups
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
            return
        super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection; bodies may be close-delimited

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr
        pass

    def do_GET(self) -> None:
        owner = self.server.owner
        path = urlsplit(self.path).path
        owner._record(path, dict(self.headers.items()))
        route = owner._routes.get(path)
        if route is None:
            self._serve_file(owner.root, path)
        else:
            route(self)

    # --- helpers used by routes -------------------------------------------------------
    def send_bytes(self, status: int, body: bytes, content_type: str = "application/octet-stream",
                   headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _serve_file(self, root: Path | None, path: str) -> None:
        if root is None:
            self.send_bytes(404, b"not found", "text/plain")
            return
        relative = unquote(path).lstrip("/")
        target = (root / relative).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            self.send_bytes(404, b"not found", "text/plain")
            return
        content_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        self.send_bytes(200, target.read_bytes(), content_type)


class LocalImageServer:
    """Threaded HTTP server on 127.0.0.1 (ephemeral port) serving ``root`` plus custom routes."""

    def __init__(self, root: str | Path | None = None, host: str = "127.0.0.1",
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.root = Path(root).resolve() if root is not None else None
        self.host = host
        self.ssl_context = ssl_context
        self.scheme = "https" if ssl_context is not None else "http"
        self._routes: dict[str, Callable[[_Handler], None]] = {}
        self._stalls: list[StallRoute] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------------
    def start(self) -> LocalImageServer:
        if self._server is not None:
            return self
        server_class = _Server6 if ":" in self.host else _Server
        server = server_class((self.host, 0), _Handler)
        server.owner = self
        if self.ssl_context is not None:
            # handshake lazily, in the handler thread, so a bad client cannot block accept()
            server.socket = self.ssl_context.wrap_socket(
                server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="LocalImageServer", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        for stall in self._stalls:
            stall.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> LocalImageServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- addresses ----------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("server is not running")
        return self._server.server_address[1]

    @property
    def allow_entry(self) -> str:
        """The CATALOG_FETCH_ALLOW_HOSTS entry that allows exactly this server."""
        return f"{self._netloc_host}:{self.port}"

    @property
    def _netloc_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    def url(self, path: str = "/") -> str:
        if not path.startswith("/"):
            path = "/" + path
        return f"{self.scheme}://{self._netloc_host}:{self.port}{path}"

    def hits(self, path: str) -> int:
        with self._lock:
            return sum(1 for seen, _ in self.requests if seen == path)

    def _record(self, path: str, headers: dict[str, str]) -> None:
        with self._lock:
            self.requests.append((path, headers))

    # --- routes -------------------------------------------------------------------------
    def route(self, path: str, handler: Callable[[_Handler], None]) -> None:
        """Register a raw handler ``handler(request_handler)`` for ``path``."""
        self._routes[path] = handler

    def respond(self, path: str, status: int = 200, body: bytes = b"",
                content_type: str = "application/octet-stream", headers: dict[str, str] | None = None) -> None:
        """A fixed response (e.g. a 500, or bytes with a misleading content type)."""
        self.route(path, lambda h: h.send_bytes(status, body, content_type, headers))

    def redirect(self, path: str, location: str, status: int = 302) -> None:
        """``path`` answers ``status`` with ``Location: location`` (absolute or relative)."""
        def handler(h: _Handler) -> None:
            h.send_bytes(status, b"", "text/plain", {"Location": location})

        self.route(path, handler)

    def stall(self, path: str, seconds: float, body: bytes = b"", status: int = 200,
              content_type: str = "application/octet-stream", before_headers: bool = True) -> StallRoute:
        """Wait up to ``seconds`` (or until released / server stop) before sending.

        ``before_headers=False`` sends the headers (with the full Content-Length) first and
        stalls before the body, i.e. a download that hangs part way.
        """
        stall = StallRoute(seconds, status, body, content_type, before_headers)
        self._stalls.append(stall)

        def handler(h: _Handler) -> None:
            stall._hit()
            if stall.before_headers:
                stall.released.wait(stall.seconds)
                h.send_bytes(stall.status, stall.body, stall.content_type)
                return
            h.send_response(stall.status)
            h.send_header("Content-Type", stall.content_type)
            h.send_header("Content-Length", str(len(stall.body)))
            h.end_headers()
            half = len(stall.body) // 2
            h.wfile.write(stall.body[:half])
            h.wfile.flush()
            stall.released.wait(stall.seconds)
            h.wfile.write(stall.body[half:])

        self.route(path, handler)
        return stall

    def huge_content_length(self, path: str, length: int = 10**12, body: bytes = b"\xff\xd8\xff\xe0") -> None:
        """Claims ``length`` bytes in Content-Length, sends ``body`` and closes."""
        def handler(h: _Handler) -> None:
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.send_header("Content-Length", str(length))
            h.end_headers()
            h.wfile.write(body)

        self.route(path, handler)

    def endless(self, path: str, chunk_size: int = 64 * 1024, limit_seconds: float = 30.0) -> None:
        """Streams bytes with no Content-Length until the client hangs up (or the server stops)."""
        chunk = (b"\xff\xd8\xff\xe0" + bytes(chunk_size))[:chunk_size]

        def handler(h: _Handler) -> None:
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.end_headers()
            end = time.monotonic() + limit_seconds
            while not self._stopping.is_set() and time.monotonic() < end:
                h.wfile.write(chunk)

        self.route(path, handler)

    def slow_headers(self, path: str, body: bytes, interval: float, chunk_size: int = 1,
                     padding: int = 200) -> None:
        """Sends the status line and headers ``chunk_size`` bytes every ``interval`` seconds
        (``padding`` bytes of extra header make it last), then ``body`` at once: a server
        that never trips a per-read timeout while the response head takes minutes."""
        head = (
            "HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\n"
            f"X-Padding: {'p' * padding}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()

        def handler(h: _Handler) -> None:
            for start in range(0, len(head), chunk_size):
                if self._stopping.wait(interval):
                    return
                h.wfile.write(head[start:start + chunk_size])
                h.wfile.flush()
            h.wfile.write(body)

        self.route(path, handler)

    def drip(self, path: str, body: bytes, interval: float, chunk_size: int = 1) -> None:
        """Sends ``body`` ``chunk_size`` bytes every ``interval`` seconds (a slow-loris server)."""
        def handler(h: _Handler) -> None:
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            for start in range(0, len(body), chunk_size):
                if self._stopping.wait(interval):
                    return
                h.wfile.write(body[start:start + chunk_size])
                h.wfile.flush()

        self.route(path, handler)


class DripServer:
    """A bare TCP server on 127.0.0.1 that answers every connection by sending ``data``
    ``chunk_size`` bytes every ``interval`` seconds, whatever the client says (a TLS
    handshake or an HTTP request), then closes. Tests bound the phases below HTTP with it:

        with DripServer(b"\\x16\\x03\\x03\\x40\\x00" + bytes(16384), interval=0.2) as drip:
            ...  # fetch https://127.0.0.1:{drip.port}/x.jpg: the TLS handshake never ends
    """

    def __init__(self, data: bytes, interval: float, chunk_size: int = 1) -> None:
        self.data = data
        self.interval = interval
        self.chunk_size = chunk_size
        self.connections = 0
        self._stopping = threading.Event()
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        if self._sock is None:
            raise RuntimeError("server is not running")
        return self._sock.getsockname()[1]

    @property
    def allow_entry(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> DripServer:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        accept = threading.Thread(target=self._accept, name="DripServer", daemon=True)
        accept.start()
        self._threads.append(accept)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            worker = threading.Thread(target=self._drip, args=(conn,), daemon=True)
            worker.start()
            self._threads.append(worker)

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            for start in range(0, len(self.data), self.chunk_size):
                if self._stopping.wait(self.interval):
                    return
                try:
                    conn.sendall(self.data[start:start + self.chunk_size])
                except OSError:  # the client gave up: what the tests expect
                    return


def make_certificates(directory: str | Path, hostnames: list[str]) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for ``hostnames`` (needs the openssl CLI).

    Returns ``(ca_pem, cert_pem, key_pem)``. Point ``SSL_CERT_FILE`` at ``ca_pem`` to make
    clients that use the default trust store (urllib3) trust the server.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the openssl command is not available")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca_pem = d / "ca.key", d / "ca.pem"
    key, csr, cert, ext = d / "server.key", d / "server.csr", d / "server.pem", d / "server.ext"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=30)

    run("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca_pem), "-days", "2",
        "-subj", "/CN=catalog-worker test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={hostnames[0]}")
    ext.write_text(
        "subjectAltName=" + ",".join(f"DNS:{name}" for name in hostnames) + "\n"
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\nauthorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\n"
    )
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_pem), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return ca_pem, cert, key


def server_ssl_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """A server-side TLS context; ``context.seen_sni`` lists the SNI names clients sent."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    seen: list[str | None] = []

    def remember(sock: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        seen.append(server_name)

    context.sni_callback = remember
    context.seen_sni = seen  # type: ignore[attr-defined]
    return context
