"""Test images written on demand: real photos, broken files and decompression bombs.

Every writer takes the destination path, creates parent directories, and returns the path.
The output format of the photo writers follows the file extension.
"""

from __future__ import annotations

import importlib.util
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

_PHOTOS = ("coffee.png", "chelsea.png", "astronaut.png", "rocket.jpg")
_SAVE_OPTIONS = {
    "JPEG": {"quality": 90},
    "WEBP": {"quality": 85},
}


def _prepare(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _format_for(path: Path) -> str:
    ext = path.suffix.lower()
    formats = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".gif": "GIF",
               ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}
    if ext not in formats:
        raise ValueError(f"cannot tell the image format from {path.name!r}")
    return formats[ext]


def _skimage_photo(seed: int) -> Image.Image | None:
    """One of scikit-image's bundled photos, read straight from the wheel (no download)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "data"
    candidate = data_dir / _PHOTOS[seed % len(_PHOTOS)]
    if not candidate.is_file():
        return None
    with Image.open(candidate) as photo:
        return photo.convert("RGB")


def _synthetic_photo(size: tuple[int, int], seed: int) -> Image.Image:
    """Gradients, blobs and noise: non-trivial, deterministic content without any data files."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / max(width - 1, 1), y / max(height - 1, 1)
    image = np.stack([u, v, 1.0 - (u + v) / 2], axis=-1) * 200 + 30
    for _ in range(8):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(0.05, 0.25) * min(width, height) + 1
        colour = rng.uniform(0, 255, size=3)
        mask = ((x - cx) ** 2 + (y - cy) ** 2) < radius**2
        image[mask] = image[mask] * 0.3 + colour * 0.7
    image += rng.normal(0, 6, size=image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")


def photo(size: tuple[int, int] = (640, 480), seed: int = 0) -> Image.Image:
    """A deterministic RGB photo of exactly ``size`` (a real photo when scikit-image is present)."""
    base = _skimage_photo(seed)
    if base is None:
        return _synthetic_photo(size, seed)
    # Crop to the target aspect ratio (offset varies with the seed), then resize.
    target_ratio = size[0] / size[1]
    bw, bh = base.size
    if bw / bh > target_ratio:
        cw, ch = max(1, round(bh * target_ratio)), bh
    else:
        cw, ch = bw, max(1, round(bw / target_ratio))
    spare_x, spare_y = bw - cw, bh - ch
    left = (seed * 37) % (spare_x + 1)
    top = (seed * 53) % (spare_y + 1)
    cropped = base.crop((left, top, left + cw, top + ch))
    return cropped.resize(size, Image.Resampling.LANCZOS)


def write_photo(path: str | Path, size: tuple[int, int] = (640, 480), seed: int = 0) -> Path:
    """Write a deterministic non-trivial RGB photo; JPEG/PNG/WEBP/GIF/BMP/TIFF by extension."""
    path = _prepare(path)
    fmt = _format_for(path)
    photo(size, seed).save(path, fmt, **_SAVE_OPTIONS.get(fmt, {}))
    return path


def write_truncated_jpeg(path: str | Path, size: tuple[int, int] = (320, 240), keep: float = 0.5) -> Path:
    """A JPEG whose header is intact but whose entropy-coded data stops part way."""
    path = _prepare(path)
    full = _prepare(path.with_name(path.name + ".full.jpg"))
    photo(size, 1).save(full, "JPEG", quality=90)
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: max(700, int(len(data) * keep))])
    return path


def write_not_an_image(path: str | Path) -> Path:
    """Plain text (an HTML error page) saved under an image name such as ``x.jpg``."""
    path = _prepare(path)
    path.write_bytes(b"<html><body><h1>404 Not Found</h1>This is not an image.</body></html>\n")
    return path


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def write_png_bomb(path: str | Path, side: int = 30000) -> Path:
    """A valid ``side`` x ``side`` 1-bit greyscale PNG of zeros, written chunk by chunk.

    30000 x 30000 = 900 MP is about 110 KB on disk and takes well under a second; no
    image-sized buffer is ever allocated (rows are compressed in batches).
    """
    path = _prepare(path)
    row = b"\x00" + bytes((side + 7) // 8)  # filter type 0 + packed 1-bit pixels
    batch_rows = max(1, (4 << 20) // len(row))
    batch = row * batch_rows
    compressor = zlib.compressobj(9)
    parts: list[bytes] = []
    remaining = side
    while remaining:
        count = min(batch_rows, remaining)
        parts.append(compressor.compress(batch if count == batch_rows else row * count))
        remaining -= count
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit, greyscale, no interlace
    with path.open("wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n")
        fh.write(_png_chunk(b"IHDR", header))
        fh.write(_png_chunk(b"IDAT", b"".join(parts)))
        fh.write(_png_chunk(b"IEND", b""))
    return path


def write_png_text_bomb(path: str | Path, expanded: int = 64 << 20, chunks: int = 1, kind: bytes = b"zTXt",
                        after_pixels: bool = False) -> Path:
    """A small valid PNG whose compressed text chunk(s) expand to ``expanded`` bytes each.

    ``kind`` is ``zTXt``, ``iTXt`` (compressed) or ``iCCP``; ``after_pixels`` puts them after
    the image data, where a decoder meets them only while loading the pixels. One 64 MiB
    chunk is about 64 KB on disk.
    """
    path = _prepare(path)
    compressor = zlib.compressobj(9)
    block = bytes(1 << 20)
    parts = [compressor.compress(block) for _ in range(expanded >> 20)]
    parts.append(compressor.compress(bytes(expanded & ((1 << 20) - 1))))
    parts.append(compressor.flush())
    packed = b"".join(parts)
    if kind == b"zTXt":
        payload = b"Comment\x00\x00" + packed
    elif kind == b"iTXt":
        payload = b"Comment\x00\x01\x00\x00\x00" + packed  # compressed, method 0, no language
    elif kind == b"iCCP":
        payload = b"icc\x00\x00" + packed
    else:
        raise ValueError(f"unknown chunk kind {kind!r}")
    pixels = zlib.compress(b"".join(b"\x00" + bytes(8 * 3) for _ in range(8)))
    metadata = b"".join(_png_chunk(kind, payload) for _ in range(chunks))
    with path.open("wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n")
        fh.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)))  # 8x8 RGB
        if not after_pixels:
            fh.write(metadata)
        fh.write(_png_chunk(b"IDAT", pixels))
        if after_pixels:
            fh.write(metadata)
        fh.write(_png_chunk(b"IEND", b""))
    return path


def write_webp_bomb(path: str | Path, side: int = 16384, container: str = "VP8L") -> Path:
    """A WebP that declares ``side`` x ``side`` pixels in a few dozen bytes.

    A tiny one-colour image is encoded (lossless ``VP8L``, lossless with EXIF so it gets a
    ``VP8X`` header, or lossy ``VP8 ``) and the size fields in its header are rewritten.
    """
    import io

    path = _prepare(path)
    buffer = io.BytesIO()
    tiny = Image.new("RGB", (16, 16), (200, 10, 10))
    if container == "VP8L":
        tiny.save(buffer, "WEBP", lossless=True)
    elif container == "VP8X":
        exif = Image.Exif()
        exif[0x010F] = "test"
        tiny.save(buffer, "WEBP", lossless=True, exif=exif.tobytes())
    elif container == "VP8":
        tiny.save(buffer, "WEBP", quality=80)
    else:
        raise ValueError(f"unknown WebP container {container!r}")
    data = bytearray(buffer.getvalue())
    if container == "VP8X":
        assert data[12:16] == b"VP8X"
        data[24:27] = (side - 1).to_bytes(3, "little")
        data[27:30] = (side - 1).to_bytes(3, "little")
    vp8l = data.find(b"VP8L")
    if container in ("VP8L", "VP8X"):
        assert vp8l >= 12 and data[vp8l + 8] == 0x2F
        bits = int.from_bytes(data[vp8l + 9:vp8l + 13], "little")
        bits = (bits & ~((1 << 28) - 1)) | (min(side, 16384) - 1) | ((min(side, 16384) - 1) << 14)
        data[vp8l + 9:vp8l + 13] = bits.to_bytes(4, "little")
    else:
        vp8 = data.find(b"VP8 ")
        assert data[vp8 + 11:vp8 + 14] == b"\x9d\x01\x2a"
        data[vp8 + 14:vp8 + 18] = struct.pack("<HH", min(side, 16383), min(side, 16383))
    path.write_bytes(bytes(data))
    return path


def write_rgba_photo(path: str | Path, size: tuple[int, int], seed: int = 0) -> Path:
    """A photo with a varying alpha channel (PNG), quick to write even at tens of megapixels."""
    path = _prepare(path)
    width, height = size
    base = photo((min(width, 640), min(height, 480)), seed).resize(size, Image.Resampling.NEAREST)
    alpha = Image.linear_gradient("L").resize(size, Image.Resampling.NEAREST)
    base.putalpha(alpha)
    base.save(path, "PNG", compress_level=1)
    return path


# --- colour modes and metadata ---------------------------------------------------------


def write_cmyk_jpeg(path: str | Path, size: tuple[int, int] = (64, 48)) -> Path:
    path = _prepare(path)
    photo(size, 2).convert("CMYK").save(path, "JPEG", quality=90)
    return path


def write_palette_png(path: str | Path, size: tuple[int, int] = (64, 48)) -> Path:
    """Palette PNG: index 0 is fully transparent (left half), index 1 opaque red (right half)."""
    path = _prepare(path)
    image = Image.new("P", size, 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    image.paste(1, (size[0] // 2, 0, size[0], size[1]))
    image.save(path, "PNG", transparency=0)
    return path


def write_16bit_png(path: str | Path, size: tuple[int, int] = (256, 16)) -> Path:
    """16-bit greyscale ramp: column x has value x * 257 (so 8-bit x after proper scaling)."""
    path = _prepare(path)
    ramp = (np.arange(size[0], dtype=np.uint32) * 65535 // max(size[0] - 1, 1)).astype(np.uint16)
    array = np.tile(ramp, (size[1], 1))
    Image.fromarray(array).save(path, "PNG")  # mode I;16
    return path


def write_rgba_png(path: str | Path, size: tuple[int, int] = (64, 48)) -> Path:
    """RGBA: left half fully transparent black, right half opaque blue."""
    path = _prepare(path)
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    image.paste((0, 0, 255, 255), (size[0] // 2, 0, size[0], size[1]))
    image.save(path, "PNG")
    return path


def write_exif_rotated_jpeg(path: str | Path, size: tuple[int, int] = (80, 40), orientation: int = 6) -> Path:
    """Pixels stored ``size`` (landscape) with EXIF orientation 6: displayed as portrait."""
    path = _prepare(path)
    image = photo(size, 3)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, "JPEG", quality=90, exif=exif.tobytes())
    return path


def write_animated_gif(path: str | Path, size: tuple[int, int] = (32, 24),
                       colours=((255, 0, 0), (0, 255, 0), (0, 0, 255))) -> Path:
    """Animated GIF, one solid colour per frame; the first frame is ``colours[0]``."""
    path = _prepare(path)
    frames = [Image.new("RGB", size, colour) for colour in colours]
    frames[0].save(path, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def write_animated_webp(path: str | Path, size: tuple[int, int] = (32, 24), colours=((255, 0, 0), (0, 255, 0))) -> Path:
    path = _prepare(path)
    frames = [Image.new("RGB", size, colour) for colour in colours]
    frames[0].save(path, "WEBP", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    return path
