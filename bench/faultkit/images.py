"""The image host of the fault suite: small real JPEGs served with a chosen latency, plus two
kinds of poison.

* ``image(name)``: a distinct JPEG (its own bytes) answered after ``latency`` seconds, so that
  work is still in flight when a fault hits;
* ``crashing(name)``: the process that fetches it is SIGKILLed while it waits for the answer,
  the way an image that crashes its decoder kills a worker. Only processes in the process
  groups the suite started (``allow_kill``) are ever killed; anything else gets a 500;
* ``hanging(name)``: the status line and headers are sent one byte per second (a slow-loris
  host), so only a deadline that covers every phase of a download ends it.

Built on tests/support/http.py's ``LocalImageServer``.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import threading
from collections import Counter
from typing import Any

from tests.support.http import LocalImageServer
from tests.support.images import photo

_BASES = 8  # distinct pictures; every URL still gets distinct bytes (a JPEG comment)


def _client_pid(client_port: int, server_port: int, pgids: set[int]) -> int | None:
    """The pid of the process (in one of ``pgids``) whose TCP socket 127.0.0.1:client_port is
    connected to our server: the socket's inode from /proc/net/tcp, then the process holding
    that inode among its file descriptors."""
    local, remote = f"0100007F:{client_port:04X}", f"0100007F:{server_port:04X}"
    inode = None
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[2] == remote:
                inode = fields[9]
                break
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.getpgid(pid) not in pgids:
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
        except OSError:
            continue  # the process went away while we looked
    return None


class ImageHost:
    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency
        self.server = LocalImageServer(None)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pgids: set[int] = set()
        self._bases: list[Any] = []  # PIL images, made on first use
        self._count = 0
        self._waiting: set[int] = set()  # client ports of image requests not answered yet
        #: pids killed by crashing routes, and crashing requests from processes we did not start
        self.crash_kills: list[int] = []
        self.crash_misses = 0

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> ImageHost:
        self.server.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.server.stop()

    @property
    def allow_entry(self) -> str:
        """The CATALOG_FETCH_ALLOW_HOSTS entry for this host."""
        return self.server.allow_entry

    def allow_kill(self, pgid: int) -> None:
        with self._lock:
            self._pgids.add(pgid)

    # --- counters --------------------------------------------------------------------------
    def total_hits(self) -> int:
        return len(self.server.requests)

    def fetching(self) -> Counter[int]:
        """Image requests waiting for their answer right now, by the process group (one that
        ``allow_kill`` registered) of the process that sent them."""
        with self._lock:
            ports, pgids = set(self._waiting), set(self._pgids)
        groups: Counter[int] = Counter()
        for port in ports:
            pid = _client_pid(port, self.server.port, pgids)
            if pid is not None:
                with contextlib.suppress(OSError):
                    groups[os.getpgid(pid)] += 1
        return groups

    # --- routes ----------------------------------------------------------------------------
    def _jpeg(self) -> bytes:
        with self._lock:
            if not self._bases:
                self._bases = [photo((320, 240), seed) for seed in range(_BASES)]
            self._count += 1
            index = self._count
        buf = io.BytesIO()
        self._bases[index % _BASES].save(buf, "JPEG", quality=85, comment=f"fault-suite {index}".encode())
        return buf.getvalue()

    def image(self, name: str, latency: float | None = None) -> str:
        body, wait = self._jpeg(), self.latency if latency is None else latency

        def handler(h: Any) -> None:  # h: tests.support.http's request handler
            port = h.client_address[1]
            with self._lock:
                self._waiting.add(port)
            try:
                if wait and self._stop.wait(wait):
                    return
            finally:
                with self._lock:
                    self._waiting.discard(port)
            h.send_bytes(200, body, "image/jpeg")

        path = f"/img/{name}.jpg"
        self.server.route(path, handler)
        return self.server.url(path)

    def crashing(self, name: str) -> str:
        def handler(h: Any) -> None:
            with self._lock:
                pgids = set(self._pgids)
            pid = _client_pid(h.client_address[1], self.server.port, pgids)
            if pid is None:
                with self._lock:
                    self.crash_misses += 1
                h.send_bytes(500, b"crash route: fetching process not found", "text/plain")
                return
            os.kill(pid, signal.SIGKILL)
            with self._lock:
                self.crash_kills.append(pid)

        path = f"/poison/{name}-crash.jpg"
        self.server.route(path, handler)
        return self.server.url(path)

    def hanging(self, name: str, interval: float = 1.0) -> str:
        head = b"HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\nX-Pad: " + b"a" * 20_000 + b"\r\n\r\n"

        def handler(h: Any) -> None:
            try:
                for i in range(len(head)):
                    if self._stop.wait(interval):
                        return
                    h.wfile.write(head[i:i + 1])
                    h.wfile.flush()
            except OSError:
                return  # the client gave up: what we want it to do

        path = f"/poison/{name}-hang.jpg"
        self.server.route(path, handler)
        return self.server.url(path)

