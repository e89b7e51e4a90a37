"""Fetch an image's bytes from a URL or a local file, safely.

* accepts ``http://``, ``https://`` and ``file://`` URLs and absolute paths, nothing else;
  local files only under ``CATALOG_FETCH_ALLOW_DIRS`` (:mod:`worker.io.local`);
* refuses to talk to internal addresses (SSRF): the host is resolved here, *every*
  resolved address is vetted, and the connection goes to the vetted IP itself (with the
  original Host header and TLS SNI / certificate hostname), so a DNS answer cannot
  change between the check and the connect; each redirect hop is vetted again;
* bounds a download in time (connect, per-read and an overall deadline that holds in every
  phase: name resolution, connect, TLS, status line, headers, body; :mod:`worker.io.deadline`)
  and size;
* quotes references in messages without credentials or secret query values.

Nothing here keeps or changes global state, so it is safe to call from many threads.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import urllib.parse
from dataclasses import dataclass

import urllib3
from urllib3 import connection as u3conn
from urllib3 import exceptions as u3exc

import worker
from worker.config import Settings
from worker.io.addresses import allow_entries, blocked_reason, is_allowed
from worker.io.deadline import Deadline, DeadlinePassed
from worker.io.errors import ImageLoadError, describe_ref, too_large_error
from worker.io.local import file_url_path, read_local_file

_ALLOW_HINT = "allow it with CATALOG_FETCH_ALLOW_HOSTS"


_CHUNK = 64 * 1024


_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


_USER_AGENT = f"catalog-worker/{worker.__version__} (+image fetch)"

_SUPPORTED = "use http://, https://, file:// or an absolute path"


def _has_control_characters(text: str) -> bool:
    return any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in text)


def fetch_bytes(ref: str, settings: Settings) -> bytes:
    """Return the bytes behind ``ref`` (http(s)/file URL or absolute path), bounded and vetted.

    Every reference that is not one of those (``ftp:``, ``data:``, relative paths, text with
    control characters, ...) raises ``bad_reference``; local files are read only under
    ``CATALOG_FETCH_ALLOW_DIRS`` (see :mod:`worker.io.local`).
    """
    if not isinstance(ref, str) or not ref.strip():
        raise ImageLoadError("bad_reference", f"empty image reference {describe_ref(ref)!r}")
    if _has_control_characters(ref):
        raise ImageLoadError(
            "bad_reference", f"image reference {describe_ref(ref)!r} contains NUL or other control characters"
        )
    text = ref.strip()
    if text.startswith("/"):
        return read_local_file(text, text, settings)
    scheme = text.split(":", 1)[0].lower() if ":" in text else ""
    if scheme == "file":
        return read_local_file(file_url_path(text), text, settings)
    if scheme in ("http", "https"):
        return _fetch_http(text, settings)
    if len(scheme) > 1 and scheme.isascii() and scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
        why = f"the {scheme}: scheme is not supported"
    else:
        why = "it is neither an http(s):// or file:// URL nor an absolute path"
    raise ImageLoadError("bad_reference", f"cannot load {describe_ref(ref)!r}: {why} ({_SUPPORTED})")


def _resolve(host: str, port: int) -> list[str]:
    """All addresses ``host`` resolves to (IP literals resolve to themselves).

    Module-level so tests can substitute a fake resolver.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in seen:
            seen.append(address)
    return seen


@dataclass(frozen=True)
class _Target:
    url: str
    scheme: str
    host: str  # hostname as in the URL (IDNA-encoded, no brackets)
    port: int
    request_uri: str
    host_header: str


def _via(url: str, original: str) -> str:
    return f" (redirected from {describe_ref(original)})" if url != original else ""


def _parse_http_url(url: str, original: str) -> _Target:
    shown = describe_ref(url)
    try:
        parsed = urllib3.util.parse_url(url)
    except u3exc.LocationParseError:
        raise ImageLoadError("bad_reference", f"cannot parse URL {shown!r}{_via(url, original)}") from None
    scheme = (parsed.scheme or "").lower()
    if scheme not in ("http", "https"):
        raise ImageLoadError(
            "bad_reference",
            f"refused to fetch {shown!r}{_via(url, original)}: the {scheme or 'missing'} scheme is not "
            "allowed, only http:// and https://",
        )
    host = (parsed.host or "").strip("[]").rstrip(".").lower()
    if not host:
        raise ImageLoadError("bad_reference", f"URL {shown!r} has no host")
    if parsed.auth:
        raise ImageLoadError("bad_reference", f"URL {shown!r} embeds credentials; they are not supported")
    default_port = 443 if scheme == "https" else 80
    port = parsed.port or default_port
    if not 0 < port < 65536:
        raise ImageLoadError("bad_reference", f"URL {shown!r} has an invalid port {port}")
    shown_host = f"[{host}]" if ":" in host else host
    host_header = shown_host if port == default_port else f"{shown_host}:{port}"
    return _Target(
        url=url,
        scheme=scheme,
        host=host,
        port=port,
        request_uri=parsed.request_uri or "/",
        host_header=host_header,
    )


def _vet(target: _Target, original: str, settings: Settings, deadline: Deadline) -> list[str]:
    """Resolve the target host and return its addresses, or raise blocked_address."""
    where = f"{describe_ref(target.url)}{_via(target.url, original)}"
    try:
        literal = ipaddress.ip_address(target.host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            addresses = deadline.call_within(_resolve, target.host, target.port)
        except DeadlinePassed:
            raise _deadline_error(original, settings, f"resolving {target.host}") from None
        except (socket.gaierror, UnicodeError, OSError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ImageLoadError(
                "unreachable", f"cannot fetch {where}: host {target.host} does not resolve ({reason})"
            ) from None
        if not addresses:
            raise ImageLoadError("unreachable", f"cannot fetch {where}: host {target.host} has no addresses")
    if deadline.fired:
        raise _deadline_error(original, settings, f"resolving {target.host}")
    entries = allow_entries(settings)
    for address in addresses:
        ip = ipaddress.ip_address(address)
        reason = blocked_reason(ip)
        if reason is None or is_allowed(ip, target.port, entries):
            continue
        subject = address if literal is not None else f"{target.host} resolves to {address}, which"
        raise ImageLoadError("blocked_address", f"refused to fetch {where}: {subject} is {reason} ({_ALLOW_HINT})")
    return addresses


def _deadline_error(url: str, settings: Settings, phase: str = "") -> ImageLoadError:
    during = f" (still {phase})" if phase else ""
    return ImageLoadError(
        "timeout",
        f"fetching {describe_ref(url)} took longer than {settings.fetch_total_timeout:g}s{during} "
        "(CATALOG_FETCH_TOTAL_TIMEOUT)",
    )


class _GuardedHTTPConnection(u3conn.HTTPConnection):
    """Registers its socket with the fetch's :class:`Deadline` as soon as it is connected."""

    def __init__(self, *args, deadline: Deadline, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = deadline

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        self._deadline.guard(sock)  # before any TLS handshake or request is sent
        return sock


class _GuardedHTTPSConnection(u3conn.HTTPSConnection):
    def __init__(self, *args, deadline: Deadline, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = deadline

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        self._deadline.guard(sock)
        return sock


class _GuardedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


def _make_pool(target: _Target, address: str, timeout: urllib3.Timeout,
               deadline: Deadline) -> urllib3.HTTPConnectionPool:
    """A one-connection pool to the vetted ``address`` that still speaks as ``target.host``."""
    if target.scheme == "https":
        return _GuardedHTTPSPool(
            address, target.port, timeout=timeout, maxsize=1, retries=False, block=False, deadline=deadline,
            cert_reqs="CERT_REQUIRED", server_hostname=target.host, assert_hostname=target.host,
        )
    return _GuardedHTTPPool(address, target.port, timeout=timeout, maxsize=1, retries=False, block=False,
                            deadline=deadline)


def _fetch_http(url: str, settings: Settings) -> bytes:
    with Deadline(settings.fetch_total_timeout) as deadline:
        current = url
        redirects = 0
        while True:
            target = _parse_http_url(current, url)
            addresses = _vet(target, url, settings, deadline)
            outcome = _request(target, addresses, url, settings, deadline)
            if isinstance(outcome, bytes):
                return outcome
            # a redirect: outcome is the absolute Location
            redirects += 1
            if redirects > settings.fetch_max_redirects:
                raise ImageLoadError(
                    "too_many_redirects",
                    f"fetching {describe_ref(url)} needed more than {settings.fetch_max_redirects} redirect(s) "
                    f"(last to {describe_ref(outcome)}; CATALOG_FETCH_MAX_REDIRECTS)",
                )
            current = outcome


_HEADERS = {
    "User-Agent": _USER_AGENT,
    "Accept": "image/*, */*;q=0.5",
    "Accept-Encoding": "identity",
}


def _request(target: _Target, addresses: list[str], original: str, settings: Settings, deadline: Deadline):
    """GET ``target`` from the first reachable vetted address; bytes, or a redirect URL (str)."""
    via = _via(target.url, original)
    last_error: ImageLoadError | None = None
    for address in addresses:
        remaining = deadline.remaining()
        if remaining <= 0:
            raise _deadline_error(original, settings, f"connecting to {target.host}")
        timeout = urllib3.Timeout(
            connect=min(settings.fetch_connect_timeout, remaining),
            read=min(settings.fetch_read_timeout, remaining),
        )
        pool = _make_pool(target, address, timeout, deadline)
        try:
            try:
                response = pool.urlopen(
                    "GET",
                    target.request_uri,
                    headers={"Host": target.host_header, **_HEADERS},
                    redirect=False,
                    retries=False,
                    assert_same_host=False,
                    preload_content=False,
                    decode_content=True,
                    release_conn=False,
                )
            except ImageLoadError:
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a code below
                if deadline.fired:
                    # the watchdog cut the connection (or the clock ran out) mid-handshake,
                    # mid-status-line or mid-headers
                    raise _deadline_error(original, settings, f"waiting for {target.host}'s response") from None
                error = _map_urllib3_error(exc, target, via, settings)
                if error.code == "unreachable" or (error.code == "timeout" and _is_connect_error(exc)):
                    last_error = error  # try the next vetted address
                    continue
                raise error from None
            if deadline.fired:
                # the watchdog cut the head short: http.client takes EOF as its end
                response.close()
                raise _deadline_error(original, settings, f"waiting for {target.host}'s response")
            try:
                return _read_response(response, target, via, original, settings, deadline)
            finally:
                response.close()  # never drain: an oversized or endless body is just dropped
        finally:
            pool.close()
            deadline.release()
    assert last_error is not None
    raise last_error


def _is_connect_error(exc: BaseException) -> bool:
    if isinstance(exc, u3exc.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    return isinstance(exc, u3exc.ConnectTimeoutError)


def _map_urllib3_error(exc: BaseException, target: _Target, via: str, settings: Settings) -> ImageLoadError:
    if isinstance(exc, u3exc.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    where = f"{describe_ref(target.url)}{via}"
    if isinstance(exc, u3exc.NewConnectionError):
        detail = _errno_text(exc)
        return ImageLoadError(
            "unreachable", f"cannot connect to {target.host} port {target.port} for {where}: {detail}"
        )
    if isinstance(exc, u3exc.ConnectTimeoutError):
        return ImageLoadError(
            "timeout",
            f"connecting to {target.host} port {target.port} for {where} timed out "
            f"after {settings.fetch_connect_timeout:g}s (CATALOG_FETCH_CONNECT_TIMEOUT)",
        )
    if isinstance(exc, (u3exc.ReadTimeoutError, TimeoutError, socket.timeout)):
        return ImageLoadError(
            "timeout",
            f"{target.host} sent nothing for {settings.fetch_read_timeout:g}s while fetching {where} "
            "(CATALOG_FETCH_READ_TIMEOUT)",
        )
    if isinstance(exc, u3exc.SSLError):
        return ImageLoadError("unreachable", f"TLS handshake with {target.host} failed for {where}: {exc}")
    if isinstance(exc, u3exc.ProtocolError):
        inner = exc.args[1] if len(exc.args) > 1 else exc
        if isinstance(inner, u3exc.IncompleteRead) or "IncompleteRead" in repr(inner):
            return ImageLoadError("truncated", f"download of {where} ended early: {inner}", transient=True)
        return ImageLoadError("unreachable", f"connection to {target.host} failed while fetching {where}: {inner}")
    if isinstance(exc, u3exc.DecodeError):
        return ImageLoadError("truncated", f"cannot decode the content-encoding of {where}: {exc}")
    if isinstance(exc, (u3exc.HTTPError, OSError)):
        return ImageLoadError("unreachable", f"fetching {where} failed: {exc}")
    raise exc


def _errno_text(exc: BaseException) -> str:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno:
            return cause.strerror or os.strerror(cause.errno)
        cause = cause.__cause__ or cause.__context__
    text = str(exc)
    return text.split(": ", 1)[-1] if ": " in text else text


def _declared_length(response) -> int | None:
    header = response.headers.get("Content-Length")
    if header is None:
        return None
    try:
        return int(header.split(",")[0].strip())
    except ValueError:
        return None


def _read_response(response, target: _Target, via: str, original: str, settings: Settings, deadline: Deadline):
    status = response.status
    where = f"{describe_ref(target.url)}{via}"
    if status in _REDIRECT_STATUSES:
        location = response.headers.get("Location")
        if location:
            return urllib.parse.urljoin(target.url, location.strip())
    if not 200 <= status < 300:
        reason = getattr(response, "reason", None) or ""
        raise ImageLoadError(
            "http_status", f"GET {where} returned HTTP {status}{(' ' + reason) if reason else ''}", status=status
        )
    limit = settings.fetch_max_bytes
    declared = _declared_length(response)
    if declared is not None and declared > limit:
        raise too_large_error(where, declared, limit, how=" (Content-Length)")
    chunks: list[bytes] = []
    total = 0
    sock = _response_socket(response)
    while True:
        remaining = deadline.remaining()
        if remaining <= 0:
            raise _deadline_error(original, settings, "reading the body")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.settimeout(min(settings.fetch_read_timeout, remaining))
        try:
            chunk = response.read1(_CHUNK)  # returns what has arrived; read() would wait for a full chunk
        except Exception as exc:  # noqa: BLE001
            if deadline.fired:
                raise _deadline_error(original, settings, "reading the body") from None
            raise _map_urllib3_error(exc, target, via, settings) from None
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise too_large_error(where, None, limit, how=" (stopped reading)")
    if deadline.fired:
        # the watchdog's shutdown looks like the end of a close-delimited body: never
        # return what arrived by then as if it were the whole image
        raise _deadline_error(original, settings, "reading the body")
    return b"".join(chunks)


def _response_socket(response) -> socket.socket | None:
    connection = getattr(response, "connection", None) or getattr(response, "_connection", None)
    sock = getattr(connection, "sock", None)
    return sock if isinstance(sock, socket.socket) else None
