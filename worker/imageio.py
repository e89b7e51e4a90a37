"""Hardened image loading: fetch bytes from a URL or file, then decode them safely.

``load_image(ref, settings)`` is the one entry point the pipeline needs. It

* accepts ``http://``, ``https://`` and ``file://`` URLs and absolute paths, nothing else;
* refuses to talk to internal addresses (SSRF): the host is resolved here, *every*
  resolved address is vetted, and the connection goes to the vetted IP itself (with the
  original Host header and TLS SNI / certificate hostname), so a DNS answer cannot
  change between the check and the connect; each redirect hop is vetted again;
* bounds a download in time (connect, per-read and overall deadline) and size;
* sniffs the format from the bytes (never the file name), allows only JPEG, PNG, WEBP,
  GIF, BMP and TIFF, and checks width x height against ``max_pixels`` from the header
  before any pixel is decoded;
* returns an RGB image with the EXIF orientation applied (first frame of animations).

Every failure is an :class:`ImageLoadError` whose ``code`` is a short machine-readable
string and whose message says what was wrong and, where relevant, which setting to change.
Nothing here keeps or changes global state, so it is safe to call from many threads.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import os
import socket
import stat
import struct
import time
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import urllib3
from PIL import (
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageFile,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    features,
)
from urllib3 import exceptions as u3exc

from worker.config import Settings, parse_allow_entry

__all__ = ["ImageLoadError", "LoadedImage", "fetch_bytes", "decode_image", "load_image"]

ERROR_CODES = frozenset(
    {
        "bad_reference",
        "not_found",
        "blocked_address",
        "unreachable",
        "timeout",
        "http_status",
        "too_many_redirects",
        "too_large",
        "too_many_pixels",
        "not_an_image",
        "unsupported_format",
        "truncated",
    }
)

_ALLOW_HINT = "allow it with CATALOG_FETCH_ALLOW_HOSTS"
_CHUNK = 64 * 1024
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = "catalog-worker/0.1 (+image fetch)"


class ImageLoadError(Exception):
    """An image could not be fetched or decoded.

    ``code`` is one of :data:`ERROR_CODES`; ``str(exc)`` is a human-readable reason.
    ``status`` is the HTTP status for ``http_status`` errors, else ``None``.
    ``transient`` says whether trying again later may succeed: timeouts, unreachable hosts,
    downloads cut off mid-way, and HTTP 408/425/429/5xx.
    """

    def __init__(self, code: str, message: str, *, status: int | None = None, transient: bool | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        if transient is None:
            transient = code in ("timeout", "unreachable") or (
                code == "http_status" and status is not None and (status in (408, 425, 429) or status >= 500)
            )
        self.transient = transient

    def __reduce__(self):  # keep code/status when pickled (Celery results, processes)
        return (_rebuild_error, (self.code, self.message, self.status, self.transient))

    def __repr__(self) -> str:
        return f"ImageLoadError({self.code!r}, {self.message!r})"


def _rebuild_error(code: str, message: str, status: int | None, transient: bool | None = None) -> ImageLoadError:
    return ImageLoadError(code, message, status=status, transient=transient)


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # RGB, EXIF orientation applied, first frame if animated
    raw: bytes  # bytes exactly as fetched
    format: str  # "JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"
    sha256: str  # hex digest of raw
    width: int  # of `image` (after orientation)
    height: int
    size_bytes: int


# =====================================================================================
# helpers
# =====================================================================================


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} bytes"  # pragma: no cover


def _too_large(what: str, size: int | None, limit: int, *, how: str = "") -> ImageLoadError:
    got = f"{_human_bytes(size)}" if size is not None else f"more than {_human_bytes(limit)}"
    return ImageLoadError(
        "too_large",
        f"{what} is {got}{how}, above the {_human_bytes(limit)} limit (CATALOG_FETCH_MAX_BYTES)",
    )


def _short(ref: str, limit: int = 200) -> str:
    return ref if len(ref) <= limit else ref[: limit - 3] + "..."


# =====================================================================================
# references
# =====================================================================================


def fetch_bytes(ref: str, settings: Settings) -> bytes:
    """Return the bytes behind ``ref`` (http(s)/file URL or absolute path), bounded and vetted."""
    if not isinstance(ref, str) or not ref.strip():
        raise ImageLoadError("bad_reference", f"empty image reference {ref!r}")
    text = ref.strip()
    if any(ch in text for ch in "\x00\r\n"):
        raise ImageLoadError("bad_reference", f"image reference {_short(ref)!r} contains control characters")
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
        f"cannot load {_short(ref)!r}: {why} (use http://, https://, file:// or an absolute path)",
    )


def _file_url_path(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ImageLoadError(
            "bad_reference",
            f"cannot load {_short(url)!r}: file:// URLs must name a local file (host {parts.netloc!r} given)",
        )
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/"):
        raise ImageLoadError("bad_reference", f"cannot load {_short(url)!r}: file:// URL has no absolute path")
    if "\x00" in path:
        raise ImageLoadError("bad_reference", f"cannot load {_short(url)!r}: path contains a NUL byte")
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
        raise ImageLoadError("bad_reference", f"cannot load {_short(ref)!r}: {path} is {kind}")
    if info.st_size > limit:
        raise _too_large(f"image file {path}", info.st_size, limit)
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
            raise ImageLoadError("bad_reference", f"cannot load {_short(ref)!r}: {path} is not a regular file")
        if info.st_size > limit:
            raise _too_large(f"image file {path}", info.st_size, limit)
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
                raise _too_large(f"image file {path}", None, limit)
    return b"".join(chunks)


# =====================================================================================
# address vetting (SSRF)
# =====================================================================================

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


# =====================================================================================
# HTTP
# =====================================================================================


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
        raise ImageLoadError("bad_reference", f"cannot parse URL {_short(url)!r}: {exc}") from None
    scheme = (parsed.scheme or "").lower()
    if scheme not in ("http", "https"):
        raise ImageLoadError(
            "bad_reference",
            f"refused to fetch {_short(url)!r}"
            + (f" (redirected from {_short(original)})" if url != original else "")
            + f": the {scheme or 'missing'} scheme is not allowed, only http:// and https://",
        )
    host = (parsed.host or "").strip("[]").rstrip(".").lower()
    if not host:
        raise ImageLoadError("bad_reference", f"URL {_short(url)!r} has no host")
    if parsed.auth:
        raise ImageLoadError("bad_reference", f"URL {_short(url)!r} embeds credentials; they are not supported")
    default_port = 443 if scheme == "https" else 80
    port = parsed.port or default_port
    if not 0 < port < 65536:
        raise ImageLoadError("bad_reference", f"URL {_short(url)!r} has an invalid port {port}")
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
    via = f" (redirected from {_short(original)})" if target.url != original else ""
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
                "unreachable", f"cannot fetch {_short(target.url)}{via}: host {target.host} does not resolve ({reason})"
            ) from None
        if not addresses:
            raise ImageLoadError(
                "unreachable", f"cannot fetch {_short(target.url)}{via}: host {target.host} has no addresses"
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
            f"refused to fetch {_short(target.url)}{via}: {subject} is {reason} ({_ALLOW_HINT})",
        )
    return addresses


def _deadline_error(url: str, settings: Settings) -> ImageLoadError:
    return ImageLoadError(
        "timeout",
        f"fetching {_short(url)} took longer than {settings.fetch_total_timeout:g}s (CATALOG_FETCH_TOTAL_TIMEOUT)",
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
                f"fetching {_short(url)} needed more than {settings.fetch_max_redirects} redirect(s) "
                f"(last to {_short(outcome)}; CATALOG_FETCH_MAX_REDIRECTS)",
            )
        current = outcome


def _request(target: _Target, addresses: list[str], original: str, settings: Settings, deadline: float):
    """GET ``target`` from the first reachable vetted address; bytes, or a redirect URL (str)."""
    via = f" (redirected from {_short(original)})" if target.url != original else ""
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
    where = f"{_short(target.url)}{via}"
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
    where = f"{_short(target.url)}{via}"
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
            raise _too_large(where, declared, limit, how=" (Content-Length)")
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
            raise _too_large(where, None, limit, how=" (stopped reading)")
    return b"".join(chunks)


def _response_socket(response) -> socket.socket | None:
    connection = getattr(response, "connection", None) or getattr(response, "_connection", None)
    sock = getattr(connection, "sock", None)
    return sock if isinstance(sock, socket.socket) else None


# =====================================================================================
# decoding
# =====================================================================================


def _sniff(data: bytes) -> str | None:
    head = data[:32]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "TIFF"
    if head.startswith(b"BM") and len(head) >= 18:
        header_size = struct.unpack_from("<I", head, 14)[0]
        if header_size in (12, 16, 40, 52, 56, 64, 108, 124):
            return "BMP"
    return None


_KNOWN_OTHER = (
    (lambda d: d[4:8] == b"ftyp" and d[8:12] in (b"avif", b"avis"), "AVIF"),
    (lambda d: d[4:8] == b"ftyp" and d[8:12] in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"), "HEIF/HEIC"),
    (lambda d: d.startswith(b"\xff\x0a") or d.startswith(b"\x00\x00\x00\x0cJXL \r\n\x87\n"), "JPEG XL"),
    (lambda d: d.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n") or d.startswith(b"\xff\x4f\xff\x51"), "JPEG 2000"),
    (lambda d: d.startswith(b"%PDF-"), "PDF"),
    (lambda d: d.startswith(b"8BPS"), "PSD"),
    (lambda d: d.startswith(b"\x00\x00\x01\x00") or d.startswith(b"\x00\x00\x02\x00"), "ICO"),
    (lambda d: d.startswith(b"qoif"), "QOI"),
    (lambda d: d.startswith(b"\x76\x2f\x31\x01"), "OpenEXR"),
    (lambda d: b"<svg" in d[:1024].lower() and d.lstrip()[:1] == b"<", "SVG"),
)


def _identify_other(data: bytes) -> str | None:
    for test, name in _KNOWN_OTHER:
        if test(data):
            return name
    # Formats Pillow itself recognises; only the accept() checks run, never a decoder.
    Image.init()  # idempotent: registers Pillow's plugins so their signatures can be checked
    prefix = data[:16]
    for name, (_factory, accept) in list(Image.OPEN.items()):
        if accept is None or name in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "DIB", "MPO"):
            continue
        try:
            result = accept(prefix)
        except Exception:  # noqa: BLE001 - a plugin's accept() is best effort
            continue
        if result is True or (result and not isinstance(result, str)):
            return name
    return None


def _factories() -> dict[str, Callable[[io.BytesIO], ImageFile.ImageFile]]:
    factories: dict[str, Callable] = {
        "JPEG": JpegImagePlugin.JpegImageFile,
        "PNG": PngImagePlugin.PngImageFile,
        "GIF": GifImagePlugin.GifImageFile,
        "BMP": BmpImagePlugin.BmpImageFile,
        "TIFF": TiffImagePlugin.TiffImageFile,
    }
    if features.check_module("webp"):
        from PIL import WebPImagePlugin

        factories["WEBP"] = WebPImagePlugin.WebPImageFile
    return factories


_FACTORIES = _factories()  # read-only after import

# What a corrupt or cut-off file makes Pillow's decoders raise.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error, zlib.error)


def _looks_like_text(data: bytes) -> bool:
    sample = data[:512]
    if not sample:
        return False
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(sample) - 4:
            return False
    return all(b >= 0x20 or b in b"\t\r\n\f" for b in sample)


def _decode_failure(fmt: str, exc: BaseException, what: str) -> ImageLoadError:
    """``truncated`` for damaged data; ``unsupported_format`` when Pillow says it cannot
    handle a valid variant (a TIFF pixel layout, a BMP compression, ...)."""
    text = str(exc) or type(exc).__name__
    lowered = text.lower()
    if any(word in lowered for word in ("unsupported", "not supported", "unknown pixel mode", "unknown compression")):
        return ImageLoadError("unsupported_format", f"this {fmt} variant is not supported: {text}")
    return ImageLoadError("truncated", f"{fmt} {what}: {text}")


def _pixels_error(width: int, height: int, settings: Settings) -> ImageLoadError:
    pixels = width * height
    return ImageLoadError(
        "too_many_pixels",
        f"image has {width}x{height} = {pixels / 1e6:.1f} MP, above the "
        f"{settings.max_pixels / 1e6:.1f} MP limit (CATALOG_MAX_PIXELS)",
    )


def decode_image(data: bytes, settings: Settings) -> tuple[Image.Image, str]:
    """Decode ``data`` into an RGB image; return it with the sniffed format name."""
    if not data:
        raise ImageLoadError("not_an_image", "data is empty (0 bytes)")
    fmt = _sniff(data)
    if fmt is None:
        other = _identify_other(data)
        if other is not None:
            raise ImageLoadError(
                "unsupported_format",
                f"{other} images are not supported (only JPEG, PNG, WEBP, GIF, BMP, TIFF)",
            )
        hint = "it looks like text" if _looks_like_text(data) else "no known image signature"
        raise ImageLoadError(
            "not_an_image", f"data is not an image ({hint}; starts with {bytes(data[:16])!r})"
        )
    factory = _FACTORIES.get(fmt)
    if factory is None:
        raise ImageLoadError("unsupported_format", f"{fmt} decoding is not available in this Pillow build")

    try:
        opened = factory(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError("too_many_pixels", f"{fmt} image is too large: {exc} (CATALOG_MAX_PIXELS)") from None
    except _DECODE_ERRORS as exc:
        raise _decode_failure(fmt, exc, "header is corrupt or cut off") from None

    with opened:
        width, height = opened.size
        if width <= 0 or height <= 0:
            raise ImageLoadError("truncated", f"{fmt} header gives an empty size {width}x{height}")
        if width * height > settings.max_pixels:
            raise _pixels_error(width, height, settings)
        try:
            opened.load()  # frame 0 only; other frames of an animation are never decoded
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageLoadError("too_many_pixels", f"{fmt} image is too large: {exc} (CATALOG_MAX_PIXELS)") from None
        except MemoryError:
            raise _pixels_error(width, height, settings) from None
        except _DECODE_ERRORS as exc:
            raise _decode_failure(fmt, exc, "data is truncated or corrupt") from None
        frame = _apply_orientation(opened)
        if frame.width * frame.height > settings.max_pixels:
            raise _pixels_error(frame.width, frame.height, settings)
        try:
            rgb = _to_rgb(frame)
        except ValueError as exc:
            raise ImageLoadError("unsupported_format", f"{fmt} image in mode {frame.mode} cannot be converted to RGB: {exc}") from None
    return rgb, fmt


def _apply_orientation(image: ImageFile.ImageFile) -> Image.Image:
    """A copy of ``image`` turned upright per its EXIF orientation tag."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose an otherwise good image
        return image.copy()


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _wide_to_rgb(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit RGB, scaled (not clipped)."""
    mode = image.mode
    array = np.asarray(image)
    if mode.startswith("I;16"):
        scaled = (array.astype(np.uint32) * 255 + 32767) // 65535
    else:
        values = array.astype(np.float64)
        finite = values[np.isfinite(values)] if mode == "F" else values
        low = float(finite.min()) if finite.size else 0.0
        high = float(finite.max()) if finite.size else 0.0
        if mode == "F" and low >= 0.0 and high <= 1.0:
            scaled = values * 255.0
        elif mode == "I" and low >= 0 and high <= 65535 and high > 255:
            scaled = values * (255.0 / 65535.0)
        elif low >= 0 and high <= 255:
            scaled = values
        elif high > low:
            scaled = (values - low) * (255.0 / (high - low))
        else:
            scaled = np.zeros_like(values)
        scaled = np.nan_to_num(np.rint(scaled), nan=0.0, posinf=255.0, neginf=0.0)
    grey = Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8))
    return grey.convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_on_white(image)
    if mode in ("P", "L", "RGB", "1") and "transparency" in image.info:
        return _composite_on_white(image)
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _wide_to_rgb(image)
    if mode == "1":
        return image.convert("L").convert("RGB")
    return image.convert("RGB")


# =====================================================================================
# entry point
# =====================================================================================


def load_image(ref: str, settings: Settings) -> LoadedImage:
    """Fetch ``ref`` and decode it; raise :class:`ImageLoadError` on any failure."""
    raw = fetch_bytes(ref, settings)
    try:
        image, fmt = decode_image(raw, settings)
    except ImageLoadError as exc:
        raise ImageLoadError(exc.code, f"{_short(ref)}: {exc.message}", status=exc.status, transient=exc.transient) from None
    return LoadedImage(
        image=image,
        raw=raw,
        format=fmt,
        sha256=hashlib.sha256(raw).hexdigest(),
        width=image.width,
        height=image.height,
        size_bytes=len(raw),
    )
