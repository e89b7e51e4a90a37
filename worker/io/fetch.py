"""Fetch an image's bytes from a URL or a local file, safely.

* accepts ``http://``, ``https://`` and ``file://`` URLs and absolute paths, nothing else;
* refuses to talk to internal addresses (SSRF): the host is resolved here, *every*
  resolved address is vetted, and the connection goes to the vetted IP itself (with the
  original Host header and TLS SNI / certificate hostname), so a DNS answer cannot
  change between the check and the connect; each redirect hop is vetted again;
* bounds a download in time (connect, per-read and overall deadline) and size.

Nothing here keeps or changes global state, so it is safe to call from many threads.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
import time
import urllib.parse
from dataclasses import dataclass

import urllib3
from urllib3 import exceptions as u3exc

from worker.config import Settings, parse_allow_entry
from worker.io.errors import ImageLoadError, shorten, too_large_error

_ALLOW_HINT = "allow it with CATALOG_FETCH_ALLOW_HOSTS"


_CHUNK = 64 * 1024


_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


_USER_AGENT = "catalog-worker/0.1 (+image fetch)"


def fetch_bytes(ref: str, settings: Settings) -> bytes:
    """Return the bytes behind ``ref`` (http(s)/file URL or absolute path), bounded and vetted."""
    if not isinstance(ref, str) or not ref.strip():
        raise ImageLoadError("bad_reference", f"empty image reference {ref!r}")
    text = ref.strip()
    if any(ch in text for ch in "\x00\r\n"):
        raise ImageLoadError("bad_reference", f"image reference {shorten(ref)!r} contains control characters")
    if text.startswith("/"):
        return _read_file(text, text, settings)
    scheme = text.split(":", 1)[0].lower() if ":" in text else ""
    if scheme == "file":
        return _read_file(_file_url_path(text), text, settings)
    if scheme in ("http", "https"):
        return _fetch_http(text, settings)
    if scheme and len(scheme) > 1 and scheme.isascii() and scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
        why = f"the {scheme}: scheme is not supported"
    else:
        why = "it is neither an http(s):// or file:// URL nor an absolute path"
    raise ImageLoadError(
        "bad_reference",
        f"cannot load {shorten(ref)!r}: {why} (use http://, https://, file:// or an absolute path)",
    )


def _file_url_path(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ImageLoadError(
            "bad_reference",
            f"cannot load {shorten(url)!r}: file:// URLs must name a local file (host {parts.netloc!r} given)",
        )
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/"):
        raise ImageLoadError("bad_reference", f"cannot load {shorten(url)!r}: file:// URL has no absolute path")
    if "\x00" in path:
        raise ImageLoadError("bad_reference", f"cannot load {shorten(url)!r}: path contains a NUL byte")
    return path


def _read_file(path: str, ref: str, settings: Settings) -> bytes:
    limit = settings.fetch_max_bytes
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageLoadError("not_found", f"image file {path} does not exist") from None
    except NotADirectoryError:
        raise ImageLoadError("not_found", f"image file {path} does not exist (a parent is not a directory)") from None
    except PermissionError:
        raise ImageLoadError("not_found", f"image file {path} cannot be read: permission denied") from None
    except OSError as exc:
        raise ImageLoadError("not_found", f"image file {path} cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise ImageLoadError("bad_reference", f"cannot load {shorten(ref)!r}: {path} is {kind}")
    if info.st_size > limit:
        raise too_large_error(f"image file {path}", info.st_size, limit)
    try:
        # O_NONBLOCK: never hang on a FIFO swapped in after the stat above.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageLoadError("not_found", f"image file {path} does not exist") from None
    except OSError as exc:
        raise ImageLoadError("not_found", f"image file {path} cannot be read: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb", buffering=0) as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ImageLoadError("bad_reference", f"cannot load {shorten(ref)!r}: {path} is not a regular file")
        if info.st_size > limit:
            raise too_large_error(f"image file {path}", info.st_size, limit)
        chunks: list[bytes] = []
        total = 0
        while True:
            try:
                chunk = fh.read(min(1 << 20, limit + 1 - total))
            except OSError as exc:
                raise ImageLoadError("not_found", f"image file {path} cannot be read: {exc.strerror or exc}") from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # the file grew after the size check
                raise too_large_error(f"image file {path}", None, limit)
    return b"".join(chunks)


_CGNAT = ipaddress.ip_network("100.64.0.0/10")


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "IPv4-mapped"
    if ip.sixtofour is not None:
        return ip.sixtofour, "6to4"
    if ip.teredo is not None:
        return ip.teredo[1], "Teredo"
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64"
    return None


def _blocked_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be fetched from, or None when it is a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            v4, kind = embedded
            inner = _blocked_reason(v4)
            if inner is not None:
                return f"an {kind} form of {v4}, {inner}"
            return None
        if ip in _NAT64_LOCAL:
            return "a local-use NAT64 address"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip in _METADATA:
        return "a link-local address (the cloud metadata service)"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "a shared (CGNAT 100.64.0.0/10) address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "a site-local address"
    if ip.is_reserved:
        return "a reserved address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "not a globally routable address"
    return None


def _allow_entries(settings: Settings) -> list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]]:
    return [parse_allow_entry(entry) for entry in settings.fetch_allow_hosts]


def _is_allowed(ip: IPAddress, port: int, entries) -> bool:
    candidates: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
            candidates = [ip]
        if ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
    for network, allowed_port in entries:
        if allowed_port is not None and allowed_port != port:
            continue
        for candidate in candidates:
            if candidate.version == network.version and candidate in network:
                return True
    return False


def _resolve(host: str, port: int) -> list[str]:
    """All addresses ``host`` resolves to (IP literals resolve to themselves).

    Module-level so tests can substitute a fake resolver.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = sockaddr[0]
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


def _parse_http_url(url: str, original: str) -> _Target:
    try:
        parsed = urllib3.util.parse_url(url)
    except u3exc.LocationParseError as exc:
        raise ImageLoadError("bad_reference", f"cannot parse URL {shorten(url)!r}: {exc}") from None
    scheme = (parsed.scheme or "").lower()
    if scheme not in ("http", "https"):
        raise ImageLoadError(
            "bad_reference",
            f"refused to fetch {shorten(url)!r}"
            + (f" (redirected from {shorten(original)})" if url != original else "")
            + f": the {scheme or 'missing'} scheme is not allowed, only http:// and https://",
        )
    host = (parsed.host or "").strip("[]").rstrip(".").lower()
    if not host:
        raise ImageLoadError("bad_reference", f"URL {shorten(url)!r} has no host")
    if parsed.auth:
        raise ImageLoadError("bad_reference", f"URL {shorten(url)!r} embeds credentials; they are not supported")
    default_port = 443 if scheme == "https" else 80
    port = parsed.port or default_port
    if not 0 < port < 65536:
        raise ImageLoadError("bad_reference", f"URL {shorten(url)!r} has an invalid port {port}")
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


def _vet(target: _Target, original: str, settings: Settings, deadline: float) -> list[str]:
    """Resolve the target host and return its addresses, or raise blocked_address."""
    via = f" (redirected from {shorten(original)})" if target.url != original else ""
    try:
        literal = ipaddress.ip_address(target.host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            addresses = _resolve(target.host, target.port)
        except (socket.gaierror, UnicodeError, OSError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ImageLoadError(
                "unreachable", f"cannot fetch {shorten(target.url)}{via}: host {target.host} does not resolve ({reason})"
            ) from None
        if not addresses:
            raise ImageLoadError(
                "unreachable", f"cannot fetch {shorten(target.url)}{via}: host {target.host} has no addresses"
            )
    if time.monotonic() > deadline:
        raise _deadline_error(target.url, settings)
    entries = _allow_entries(settings)
    for address in addresses:
        ip = ipaddress.ip_address(address)
        reason = _blocked_reason(ip)
        if reason is None or _is_allowed(ip, target.port, entries):
            continue
        subject = address if literal is not None else f"{target.host} resolves to {address}, which"
        raise ImageLoadError(
            "blocked_address",
            f"refused to fetch {shorten(target.url)}{via}: {subject} is {reason} ({_ALLOW_HINT})",
        )
    return addresses


def _deadline_error(url: str, settings: Settings) -> ImageLoadError:
    return ImageLoadError(
        "timeout",
        f"fetching {shorten(url)} took longer than {settings.fetch_total_timeout:g}s (CATALOG_FETCH_TOTAL_TIMEOUT)",
    )


def _make_pool(target: _Target, address: str, timeout: urllib3.Timeout) -> urllib3.HTTPConnectionPool:
    """A one-connection pool to the vetted ``address`` that still speaks as ``target.host``."""
    common = dict(host=address, port=target.port, timeout=timeout, maxsize=1, retries=False, block=False)
    if target.scheme == "https":
        return urllib3.HTTPSConnectionPool(
            **common,
            cert_reqs="CERT_REQUIRED",
            server_hostname=target.host,
            assert_hostname=target.host,
        )
    return urllib3.HTTPConnectionPool(**common)


def _fetch_http(url: str, settings: Settings) -> bytes:
    deadline = time.monotonic() + settings.fetch_total_timeout
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
                f"fetching {shorten(url)} needed more than {settings.fetch_max_redirects} redirect(s) "
                f"(last to {shorten(outcome)}; CATALOG_FETCH_MAX_REDIRECTS)",
            )
        current = outcome


def _request(target: _Target, addresses: list[str], original: str, settings: Settings, deadline: float):
    """GET ``target`` from the first reachable vetted address; bytes, or a redirect URL (str)."""
    via = f" (redirected from {shorten(original)})" if target.url != original else ""
    last_error: ImageLoadError | None = None
    for address in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _deadline_error(original, settings)
        timeout = urllib3.Timeout(
            connect=min(settings.fetch_connect_timeout, remaining),
            read=min(settings.fetch_read_timeout, remaining),
        )
        pool = _make_pool(target, address, timeout)
        try:
            try:
                response = pool.urlopen(
                    "GET",
                    target.request_uri,
                    headers={
                        "Host": target.host_header,
                        "User-Agent": _USER_AGENT,
                        "Accept": "image/*, */*;q=0.5",
                        "Accept-Encoding": "identity",
                    },
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
                error = _map_urllib3_error(exc, target, via, settings)
                if error.code == "timeout" and time.monotonic() >= deadline:
                    raise _deadline_error(original, settings) from None
                if error.code == "unreachable" or (error.code == "timeout" and _is_connect_error(exc)):
                    last_error = error  # try the next vetted address
                    continue
                raise error from None
            try:
                return _read_response(response, target, via, original, settings, deadline)
            finally:
                response.close()  # never drain: an oversized or endless body is just dropped
        finally:
            pool.close()
    assert last_error is not None
    raise last_error


def _is_connect_error(exc: BaseException) -> bool:
    if isinstance(exc, u3exc.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    return isinstance(exc, u3exc.ConnectTimeoutError)


def _map_urllib3_error(exc: BaseException, target: _Target, via: str, settings: Settings) -> ImageLoadError:
    if isinstance(exc, u3exc.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    where = f"{shorten(target.url)}{via}"
    if isinstance(exc, u3exc.NewConnectionError):
        detail = _errno_text(exc)
        return ImageLoadError("unreachable", f"cannot connect to {target.host} port {target.port} for {where}: {detail}")
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


def _read_response(response, target: _Target, via: str, original: str, settings: Settings, deadline: float):
    status = response.status
    where = f"{shorten(target.url)}{via}"
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
    length_header = response.headers.get("Content-Length")
    if length_header is not None:
        try:
            declared = int(length_header.split(",")[0].strip())
        except ValueError:
            declared = None
        if declared is not None and declared > limit:
            raise too_large_error(where, declared, limit, how=" (Content-Length)")
    chunks: list[bytes] = []
    total = 0
    sock = _response_socket(response)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _deadline_error(original, settings)
        if sock is not None:
            try:
                sock.settimeout(min(settings.fetch_read_timeout, remaining))
            except OSError:
                pass
        try:
            chunk = response.read1(_CHUNK)  # returns what has arrived; read() would wait for a full chunk
        except Exception as exc:  # noqa: BLE001
            error = _map_urllib3_error(exc, target, via, settings)
            if error.code == "timeout" and time.monotonic() >= deadline:
                error = _deadline_error(original, settings)
            raise error from None
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise too_large_error(where, None, limit, how=" (stopped reading)")
    return b"".join(chunks)


def _response_socket(response) -> socket.socket | None:
    connection = getattr(response, "connection", None) or getattr(response, "_connection", None)
    sock = getattr(connection, "sock", None)
    return sock if isinstance(sock, socket.socket) else None
