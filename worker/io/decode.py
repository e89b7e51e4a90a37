"""Decode image bytes safely.

Sniffs the format from the bytes (never the file name), allows only JPEG, PNG, WEBP, GIF,
BMP and TIFF, checks width x height against ``max_pixels`` from the header before any pixel
is decoded, and returns an RGB image with the EXIF orientation applied (first frame of
animations).

:func:`decode_batch` decodes several photos at once into tensors for the GPU path (nvjpeg
through torchvision for JPEGs, this module's checks and Pillow for everything else).
"""

from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import (
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageFile,
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
    (lambda d: d[4:8] == b"ftyp" and d[8:12] in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"),
     "HEIF/HEIC"),
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


def _content_hint(data: bytes) -> str:
    """What non-image data looks like, in words: the bytes themselves are never quoted
    (a local file or an internal page must not end up in ``images.error``)."""
    sample = data[:512]
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(sample) - 4:
            return "no known image signature"
        text = sample[: exc.start].decode("utf-8")
    if not all(ch >= " " or ch in "\t\r\n\f" for ch in text):
        return "no known image signature"
    head = text.lstrip().lower()
    if head.startswith(("<!doctype html", "<html")) or "<body" in head:
        return "it looks like an HTML page"
    if head.startswith("<?xml") or head.startswith("<"):
        return "it looks like XML"
    if head.startswith(("{", "[")):
        return "it looks like JSON"
    return "it looks like text"


# Pillow quotes raw bytes of the file in some messages (b'...' chunk names, tag values).
_BYTES_LITERAL = re.compile(r"(?<!\w)(?:b'(?:[^'\\]|\\.)*'" + r'|b"(?:[^"\\]|\\.)*")')


def _pillow_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return _BYTES_LITERAL.sub("<bytes>", text)


def _metadata_bomb(fmt: str, exc: BaseException) -> ImageLoadError | None:
    """``decompression_bomb`` when Pillow refused a metadata chunk for its expanded size."""
    text = str(exc)
    if fmt != "PNG" or "MAX_TEXT" not in text:
        return None
    limit = PngImagePlugin.MAX_TEXT_CHUNK
    if "MAX_TEXT_MEMORY" in text:
        what = f"text chunks that expand to more than {PngImagePlugin.MAX_TEXT_MEMORY / 2**20:g} MiB in all"
    else:
        what = f"a compressed text or ICC-profile chunk that expands to more than {limit / 2**20:g} MiB"
    return ImageLoadError(
        "decompression_bomb",
        f"PNG metadata is a decompression bomb: {what}; the image is refused",
    )


def _decode_failure(fmt: str, exc: BaseException, what: str) -> ImageLoadError:
    """``truncated`` for damaged data; ``unsupported_format`` when Pillow says it cannot
    handle a valid variant (a TIFF pixel layout, a BMP compression, ...)."""
    bomb = _metadata_bomb(fmt, exc)
    if bomb is not None:
        return bomb
    text = _pillow_text(exc)
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


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _pillow_bomb_error(fmt: str, exc: BaseException, settings: Settings) -> ImageLoadError:
    """Pillow's own pixel-bomb refusal, told in terms of ``CATALOG_MAX_PIXELS``."""
    match = _BOMB_PIXELS.search(str(exc))
    pixels = int(match.group(1)) if match else None
    if pixels is not None and pixels > settings.max_pixels:
        size = f"{pixels / 1e6:.1f} MP"
        return ImageLoadError(
            "too_many_pixels",
            f"{fmt} image has {size}, above the {settings.max_pixels / 1e6:.1f} MP limit (CATALOG_MAX_PIXELS)",
        )
    shown = f"{pixels / 1e6:.1f} MP" if pixels is not None else "too many pixels"
    return ImageLoadError(
        "too_many_pixels",
        f"{fmt} image has {shown}: more than the decoder accepts at all, although "
        f"CATALOG_MAX_PIXELS ({settings.max_pixels / 1e6:.1f} MP) would allow it",
    )


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """Canvas size from a WebP header (VP8X, VP8L or VP8 chunk), or None when unreadable.

    Read here because Pillow's WebP plugin refuses a pixel bomb while opening, before its
    size can be asked, and words the refusal in its own internal limit."""
    chunk = data[12:16]
    body = data[20:40]
    try:
        if chunk == b"VP8X" and len(body) >= 10:
            return 1 + int.from_bytes(body[4:7], "little"), 1 + int.from_bytes(body[7:10], "little")
        if chunk == b"VP8L" and len(body) >= 5 and body[0] == 0x2F:
            bits = int.from_bytes(body[1:5], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8 " and len(body) >= 10 and body[3:6] == b"\x9d\x01\x2a":
            width, height = struct.unpack_from("<HH", body, 6)
            return width & 0x3FFF, height & 0x3FFF
    except (struct.error, IndexError):
        return None
    return None


def _open(fmt: str, factory, data: bytes, settings: Settings) -> ImageFile.ImageFile:
    if fmt == "WEBP":
        size = _webp_size(data)
        if size is not None and size[0] * size[1] > settings.max_pixels:
            raise _pixels_error(size[0], size[1], settings)
    try:
        return factory(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _pillow_bomb_error(fmt, exc, settings) from None
    except _DECODE_ERRORS as exc:
        raise _decode_failure(fmt, exc, "header is corrupt or cut off") from None


def decode_image(data: bytes, settings: Settings) -> tuple[Image.Image, str]:
    """Decode ``data`` into an RGB image; return it with the sniffed format name.

    Memory: the decoded frame and the RGB result are the only full-size buffers alive at
    once (no copy for orientation or for a frame that already is RGB; transparency is
    composited straight into the RGB result; wide greyscale is scaled in strips).
    """
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
        raise ImageLoadError("not_an_image", f"data is not an image ({_content_hint(data)}, {len(data)} bytes)")
    factory = _FACTORIES.get(fmt)
    if factory is None:
        raise ImageLoadError("unsupported_format", f"{fmt} decoding is not available in this Pillow build")

    opened = _open(fmt, factory, data, settings)
    try:
        width, height = opened.size
        if width <= 0 or height <= 0:
            raise ImageLoadError("truncated", f"{fmt} header gives an empty size {width}x{height}")
        if width * height > settings.max_pixels:
            raise _pixels_error(width, height, settings)
        try:
            opened.load()  # frame 0 only; other frames of an animation are never decoded
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _pillow_bomb_error(fmt, exc, settings) from None
        except MemoryError:
            raise _pixels_error(width, height, settings) from None
        except _DECODE_ERRORS as exc:
            raise _decode_failure(fmt, exc, "data is truncated or corrupt") from None
        transpose = _orientation(opened)
        try:
            rgb = _to_rgb(opened)
        except ValueError as exc:
            raise ImageLoadError(
                "unsupported_format",
                f"{fmt} image in mode {opened.mode} cannot be converted to RGB: {_pillow_text(exc)}",
            ) from None
    finally:
        opened.close()  # the decoded frame's memory goes now, unless rgb shares it
    if transpose is not None:
        rgb = rgb.transpose(transpose)  # after the conversion: one RGB buffer, not the source's
    return rgb, fmt


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(image: Image.Image) -> Image.Transpose | None:
    """The transpose that turns ``image`` upright per its EXIF (or XMP) orientation tag,
    as ``ImageOps.exif_transpose`` reads it; None when it already is."""
    try:
        value = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose an otherwise good image
        return None
    return _TRANSPOSE.get(value) if isinstance(value, int) else None


def _detached(image: Image.Image) -> Image.Image:
    """A plain image sharing ``image``'s pixels (no copy) that outlives closing the file."""
    try:
        return image._new(image.im)  # Pillow's own way to wrap an image core
    except AttributeError:  # pragma: no cover - a Pillow without it: pay for one copy
        return image.copy()


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Alpha over a white background, written straight into the RGB result: the same
    pixels as ``Image.alpha_composite`` onto opaque white, without its two extra RGBA
    buffers."""
    if image.mode not in ("RGBA", "LA"):
        image = image.convert("RGBA")  # P/L/RGB with a transparency key, PA, RGBa, La
    out = Image.new("RGB", image.size, (255, 255, 255))
    out.paste(image, (0, 0), image)  # the mask is the alpha band
    return out


_STRIP_PIXELS = 1 << 20


def _strips(image: Image.Image):
    """``(top, bottom, array)`` for horizontal strips of about a megapixel each, so wide
    modes are scaled without a float64 copy of the whole image."""
    rows = max(1, _STRIP_PIXELS // max(1, image.width))
    for top in range(0, image.height, rows):
        bottom = min(image.height, top + rows)
        yield top, bottom, np.asarray(image.crop((0, top, image.width, bottom)))


# 16-bit -> 8-bit, rounded: (v * 255 + 32767) // 65535 for every v, looked up.
_SIXTEEN_TO_EIGHT = ((np.arange(65536, dtype=np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _wide_to_rgb(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit RGB, scaled (not clipped)."""
    mode = image.mode
    out = np.empty((image.height, image.width), dtype=np.uint8)
    if mode.startswith("I;16"):
        for top, bottom, array in _strips(image):
            out[top:bottom] = _SIXTEEN_TO_EIGHT[array]
        return Image.fromarray(out).convert("RGB")
    low, high = np.inf, -np.inf
    for _top, _bottom, array in _strips(image):
        values = array[np.isfinite(array)] if mode == "F" else array
        if values.size:
            low, high = min(low, float(values.min())), max(high, float(values.max()))
    if low > high:  # no finite value at all
        low = high = 0.0
    for top, bottom, array in _strips(image):
        values = array.astype(np.float64)
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
        out[top:bottom] = np.clip(scaled, 0, 255).astype(np.uint8)
    return Image.fromarray(out).convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return _detached(image)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_on_white(image)
    if mode in ("P", "L", "RGB", "1") and "transparency" in image.info:
        return _composite_on_white(image)
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _wide_to_rgb(image)
    return image.convert("RGB")


# --- batched decode to tensors (the GPU path, docs/gpu.md) -------------------------------


@dataclass(frozen=True)
class DecodedTensor:
    """One decoded photo as a uint8 (3, H, W) RGB tensor, upright (EXIF orientation applied)."""

    tensor: Any  # torch.Tensor on the requested device
    format: str  # the sniffed format, as decode_image returns it
    decoded_on: str  # "nvjpeg" (torchvision's batched JPEG decoder, on the tensor's device) or "pillow"


def decode_batch(datas: Sequence[bytes], settings: Settings, device: Any = "cpu",
                 batched: bool | None = None) -> list[DecodedTensor | ImageLoadError]:
    """Decode several photos at once into RGB tensors on ``device``; one result per input, in
    order: the tensor, or the :class:`ImageLoadError` that photo alone fails with.

    JPEGs whose header passes the same checks as :func:`decode_image` (format sniffed from the
    bytes, pixel count against ``CATALOG_MAX_PIXELS`` before any pixel is decoded, a YCbCr or
    greyscale frame) go to ``torchvision.io.decode_jpeg`` as ONE list (nvjpeg's batched decoder
    when ``device`` is CUDA), and the EXIF orientation is applied to the tensor. Everything
    else (PNG, WebP, CMYK JPEGs...) and any JPEG that decoder refuses takes the CPU path,
    :func:`decode_image`, then moves to ``device``: the same pixels and the same error codes as
    the rest of the worker. ``batched`` defaults to "device is CUDA"; ``batched=True`` on the
    CPU runs the same code through torchvision's CPU decoder (how the tests check it).
    """
    import torch

    device = torch.device(device)
    use_batch = device.type == "cuda" if batched is None else batched
    results: list[DecodedTensor | ImageLoadError | None] = [None] * len(datas)
    queued: list[tuple[int, Image.Transpose | None]] = []
    for index, data in enumerate(datas):
        header = _jpeg_header(data, settings) if use_batch else None
        if isinstance(header, ImageLoadError):
            results[index] = header
        elif header is not None:
            queued.append((index, header[0]))
    if queued:
        _decode_jpegs(datas, queued, device, results)
    for index, data in enumerate(datas):
        if results[index] is None:
            results[index] = _decode_on_cpu(data, settings, device)
    return [result for result in results if result is not None]


def _jpeg_header(data: bytes, settings: Settings) -> tuple[Image.Transpose | None] | ImageLoadError | None:
    """For a JPEG the batched decoder can take: (its orientation,); an error for a JPEG refused
    by its header alone; None for anything the CPU path must decode."""
    if _sniff(data) != "JPEG":
        return None
    try:
        opened = _open("JPEG", JpegImagePlugin.JpegImageFile, data, settings)
    except ImageLoadError as exc:
        return exc
    try:
        width, height = opened.size
        if width <= 0 or height <= 0:
            return ImageLoadError("truncated", f"JPEG header gives an empty size {width}x{height}")
        if width * height > settings.max_pixels:
            return _pixels_error(width, height, settings)
        if opened.mode not in ("RGB", "L"):
            return None  # CMYK / YCCK: Pillow's conversion, on the CPU
        return (_orientation(opened),)
    finally:
        opened.close()


def _decode_jpegs(datas: Sequence[bytes], queued: list[tuple[int, Image.Transpose | None]], device: Any,
                  results: list[DecodedTensor | ImageLoadError | None]) -> None:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    inputs = [torch.frombuffer(bytearray(datas[index]), dtype=torch.uint8) for index, _ in queued]
    with warnings.catch_warnings():
        # torchvision 0.29 announces that TorchCodec will take its decoders over; until that
        # ships a batched nvjpeg decode, this is the one there is (docs/gpu.md).
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities", DeprecationWarning)
        try:
            decoded = decode_jpeg(inputs, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the whole call: retry one by one
            decoded = []
            for tensor in inputs:
                try:
                    decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)  # the CPU path decodes it, or says what is wrong with it
    for (index, transpose), tensor in zip(queued, decoded, strict=True):
        if tensor is not None:
            results[index] = DecodedTensor(_transposed(tensor, transpose), "JPEG", "nvjpeg")


def _transposed(tensor: Any, transpose: Image.Transpose | None) -> Any:
    """``Image.transpose`` on a (C, H, W) tensor."""
    import torch

    if transpose is None:
        return tensor
    ops: dict[Image.Transpose, Callable[[Any], Any]] = {
        Image.Transpose.FLIP_LEFT_RIGHT: lambda t: t.flip(-1),
        Image.Transpose.FLIP_TOP_BOTTOM: lambda t: t.flip(-2),
        Image.Transpose.ROTATE_180: lambda t: t.flip(-1).flip(-2),
        Image.Transpose.ROTATE_90: lambda t: torch.rot90(t, 1, dims=(-2, -1)),
        Image.Transpose.ROTATE_270: lambda t: torch.rot90(t, -1, dims=(-2, -1)),
        Image.Transpose.TRANSPOSE: lambda t: t.transpose(-1, -2),
        Image.Transpose.TRANSVERSE: lambda t: t.transpose(-1, -2).flip(-1).flip(-2),
    }
    return ops[transpose](tensor).contiguous()


def _decode_on_cpu(data: bytes, settings: Settings, device: Any) -> DecodedTensor | ImageLoadError:
    import torch

    try:
        image, fmt = decode_image(data, settings)
    except ImageLoadError as exc:
        return exc
    tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return DecodedTensor(tensor.to(device), fmt, "pillow")
