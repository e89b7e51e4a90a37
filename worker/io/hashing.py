"""64-bit perceptual hashes (pHash, dHash) and their signed-BIGINT storage form."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image


@functools.lru_cache(maxsize=4)
def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    mat = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    mat[0, :] = np.sqrt(1.0 / n)
    return mat


def _gray(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    # Grey first, then resize (the order every stored hash was computed in); an image that
    # already is grey is not converted again (convert("L") would copy it).
    grey = image if image.mode == "L" else image.convert("L")
    return np.asarray(grey.resize(size, Image.Resampling.LANCZOS), dtype=np.float64)


def _bits_to_int(bits: np.ndarray) -> int:
    """Bits (row-major, first bit most significant) -> unsigned integer."""
    return int.from_bytes(np.packbits(np.asarray(bits, dtype=bool).ravel()).tobytes(), "big")


def phash(image: Image.Image) -> int:
    """DCT hash: low 8x8 frequencies of a 32x32 grey image against their median (DC excluded
    from the median so overall brightness does not move the threshold)."""
    pixels = _gray(image, (32, 32))
    dct = _dct_matrix(32)
    coeffs = (dct @ pixels @ dct.T)[:8, :8]
    median = np.median(coeffs.ravel()[1:])
    return _bits_to_int(coeffs > median)


def hashes(image: Image.Image) -> tuple[int, int]:
    """(pHash, dHash) of ``image``, converting it to grey once for both."""
    grey = image if image.mode == "L" else image.convert("L")
    return phash(grey), dhash(grey)


def dhash(image: Image.Image) -> int:
    """Gradient hash: is each pixel brighter than its right neighbour (9x8 grey image)."""
    pixels = _gray(image, (9, 8))
    return _bits_to_int(pixels[:, 1:] > pixels[:, :-1])


def hamming(a: int, b: int) -> int:
    return ((a ^ b) & 0xFFFFFFFFFFFFFFFF).bit_count()


def to_signed64(value: int) -> int:
    """Unsigned 64-bit hash -> value that fits Postgres BIGINT."""
    return value - (1 << 64) if value >= (1 << 63) else value


def to_unsigned64(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


def to_hex(value: int | None) -> str | None:
    return None if value is None else f"{to_unsigned64(value):016x}"
