"""One overall deadline for a download, enforced in every phase.

Per-operation socket timeouts only bound the wait for the *next* byte: a server that sends
its status line and headers one byte a second never trips them, and ``http.client`` reads
headers inside calls this code cannot interrupt between bytes. So a :class:`Deadline` also
runs a watchdog: every socket the download opens is registered with it (a duplicate of the
descriptor, so the registration survives urllib3 wrapping the socket in TLS), and when the
deadline passes the watchdog shuts those sockets down. Whatever phase was waiting (TLS
handshake, status line, headers, body) then fails at once, and the caller, seeing
:attr:`Deadline.fired`, reports ``timeout``.

Name resolution cannot be interrupted at all (``getaddrinfo`` blocks in C), so it runs in a
helper thread that the fetch stops waiting for at the deadline.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class DeadlinePassed(Exception):
    """Raised by :meth:`Deadline.call_within` when the deadline passes first."""


class Deadline:
    """``seconds`` from now; use as a context manager so the watchdog always stops."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._fired = False
        self._timer = threading.Timer(max(0.0, seconds), self._fire)
        self._timer.daemon = True
        self._timer.name = "fetch-deadline"

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()
        self.release()

    def remaining(self) -> float:
        return self.at - time.monotonic()

    @property
    def fired(self) -> bool:
        """True once the deadline has passed (the watchdog ran or the clock says so)."""
        return self._fired or time.monotonic() >= self.at

    def guard(self, sock: socket.socket) -> None:
        """Cut ``sock``'s connection when the deadline passes (at once if it has)."""
        try:
            watched = sock.dup()
        except OSError:
            return
        with self._lock:
            self._sockets.append(watched)
            late = self._fired
        if late:
            _shutdown(watched)

    def release(self) -> None:
        """Forget the sockets registered so far (their connections are done with)."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _fire(self) -> None:
        with self._lock:
            self._fired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)

    def call_within(self, func: Callable[..., T], *args: object) -> T:
        """``func(*args)`` in a helper thread; raise :class:`DeadlinePassed` if the deadline
        comes first (the thread is left to finish on its own: it only resolves a name)."""
        outcome: dict[str, object] = {}
        done = threading.Event()

        def work() -> None:
            try:
                outcome["value"] = func(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                outcome["error"] = exc
            finally:
                done.set()

        threading.Thread(target=work, name="fetch-resolve", daemon=True).start()
        if not done.wait(max(0.0, self.remaining())):
            raise DeadlinePassed
        if "error" in outcome:
            raise outcome["error"]  # type: ignore[misc]
        return outcome["value"]  # type: ignore[return-value]


def _shutdown(sock: socket.socket) -> None:
    # shutdown acts on the connection, not the descriptor: the reader blocked on the
    # original socket (or its TLS wrapper) wakes up with EOF or an error.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
