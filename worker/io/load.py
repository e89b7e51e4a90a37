"""Hardened image loading: fetch bytes from a URL or file, then decode them safely.

``load_image(ref, settings)`` is the one entry point the pipeline needs. It

* accepts ``http://``, ``https://`` and ``file://`` URLs and absolute paths, nothing else,
  and reads local files only under ``CATALOG_FETCH_ALLOW_DIRS``;
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
from dataclasses import dataclass

from PIL import (
    Image,
)

from worker.config import Settings
from worker.io.decode import decode_image
from worker.io.errors import ImageLoadError, describe_ref
from worker.io.fetch import fetch_bytes

__all__ = ["ImageLoadError", "LoadedImage", "fetch_bytes", "decode_image", "load_image"]


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # RGB, EXIF orientation applied, first frame if animated
    raw: bytes  # bytes exactly as fetched
    format: str  # "JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"
    sha256: str  # hex digest of raw
    width: int  # of `image` (after orientation)
    height: int
    size_bytes: int


def load_image(ref: str, settings: Settings) -> LoadedImage:
    """Fetch ``ref`` and decode it; raise :class:`ImageLoadError` on any failure."""
    raw = fetch_bytes(ref, settings)
    try:
        image, fmt = decode_image(raw, settings)
    except ImageLoadError as exc:
        raise ImageLoadError(
            exc.code, f"{describe_ref(ref)}: {exc.message}", status=exc.status, transient=exc.transient
        ) from None
    return LoadedImage(
        image=image,
        raw=raw,
        format=fmt,
        sha256=hashlib.sha256(raw).hexdigest(),
        width=image.width,
        height=image.height,
        size_bytes=len(raw),
    )
