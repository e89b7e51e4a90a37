"""Why an image could not be loaded: :class:`ImageLoadError` and its codes.

Error texts end up in ``images.error``, which downstream systems and reviewers read, so they
never carry secrets: every message is scrubbed of URL credentials (``user:pw@``) and of the
values of query parameters that look like secrets (signatures, tokens, keys), control
characters are shown escaped, and no caller quotes the bytes of a fetched file.
"""

from __future__ import annotations

import re

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
        "decompression_bomb",
    }
)


class ImageLoadError(Exception):
    """An image could not be fetched or decoded.

    ``code`` is one of :data:`ERROR_CODES`; ``str(exc)`` is a human-readable reason.
    ``status`` is the HTTP status for ``http_status`` errors, else ``None``.
    ``transient`` says whether trying again later may succeed: timeouts, unreachable hosts,
    downloads cut off mid-way, and HTTP 408/425/429/5xx.
    """

    def __init__(self, code: str, message: str, *, status: int | None = None, transient: bool | None = None) -> None:
        message = scrub(message)
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


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} bytes"  # pragma: no cover


def too_large_error(what: str, size: int | None, limit: int, *, how: str = "") -> ImageLoadError:
    got = f"{_human_bytes(size)}" if size is not None else f"more than {_human_bytes(limit)}"
    return ImageLoadError(
        "too_large",
        f"{what} is {got}{how}, above the {_human_bytes(limit)} limit (CATALOG_FETCH_MAX_BYTES)",
    )


def shorten(ref: str, limit: int = 200) -> str:
    return ref if len(ref) <= limit else ref[: limit - 3] + "..."


# ``scheme://userinfo@`` anywhere in a text: the userinfo is replaced, the rest kept.
_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#\s@'\"]*@")
# ``name=value`` after ``?``, ``&``, ``;`` or ``#`` whose name looks like it carries a secret
# (presigned-URL signatures, API keys, access tokens, passwords).
_SECRET_PARAM = re.compile(
    r"([?&;#][^=&;#?\s'\"]*?(?:sig|token|secret|passw|pwd|key|auth|cred|session)[^=&;#?\s'\"]*=)[^&;#\s'\"]*",
    re.IGNORECASE,
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def scrub(text: str) -> str:
    """``text`` with URL credentials and secret-looking query values replaced by ``***`` and
    control characters escaped (``\\x00``), so it can be stored and shown safely."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    text = _USERINFO.sub(r"\1***@", text)
    return _SECRET_PARAM.sub(r"\1***", text)


def describe_ref(ref: object, limit: int = 200) -> str:
    """How an image reference is quoted in a message: scrubbed, then shortened."""
    text = ref if isinstance(ref, str) else repr(ref)
    return shorten(scrub(text), limit)
