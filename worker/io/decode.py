"""Decode image bytes safely.

Sniffs the format from the bytes (never the file name), allows only JPEG, PNG, WEBP, GIF,
BMP and TIFF, checks width x height against ``max_pixels`` from the header before any pixel
is decoded, and returns an RGB image with the EXIF orientation applied (first frame of
animations).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
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

from worker.config import Settings
from worker.io.errors import ImageLoadError


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
