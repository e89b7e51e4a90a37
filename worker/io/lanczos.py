"""Pillow's Lanczos resize of an 8-bit greyscale image, bit for bit, as matrix products.

The metadata step's pHash and dHash start with ``grey.resize((32, 32) | (9, 8), LANCZOS)`` of
the full photo (:mod:`worker.io.hashing`), and every stored hash was computed that way, so the
values must not move by one bit. Pillow resamples an 8-bit image in two passes, each a sum of
``pixel * integer coefficient`` (coefficients in fixed point with 22 fraction bits) rounded and
clipped back to 8 bits. Its loop is scalar: ~2.5-3 ms per hash for a 1 MP photo, because each
output pixel of a 38x reduction reads ~230 input pixels.

:func:`lanczos_grey` computes the same integer coefficients (Pillow's ``precompute_coeffs`` and
``normalize_coeffs_8bpc``, in the same double arithmetic) and evaluates each pass as one float64
matrix product (BLAS): every product and partial sum is an integer below 2**53, so the sums are
exact and the rounding is Pillow's. Several output sizes share one pass over the photo.
Pillow runs the vertical pass first when the height shrinks by more than twice as many pixels
as the width (recent Pillow; older ones always went horizontal first): which rule the installed
Pillow follows is checked once, on a 2 x 40 probe image.

``tests/worker/steps/test_overhead_cuts.py`` pins the result to ``Image.resize`` on photos of
many sizes (odd, tiny, upscaled, one pixel wide, tall strips).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images
_SUPPORT = 3.0  # Lanczos-3
_HALF = float(1 << (PRECISION_BITS - 1))
_ONE = float(1 << PRECISION_BITS)
# A coefficient whose scaled value is this close to a rounding tie is recomputed with the C
# library's sin (what Pillow calls): numpy's vectorised sin may differ from it by an ulp.
_TIE_MARGIN = 1e-6


def _lanczos(x: np.ndarray, sin: Callable[[np.ndarray], np.ndarray] = np.sin) -> np.ndarray:
    """Pillow's ``lanczos_filter``: sinc(x) * sinc(x / 3) on [-3, 3), in the same operations."""

    def sinc(v: np.ndarray) -> np.ndarray:
        scaled = v * math.pi
        with np.errstate(invalid="ignore", divide="ignore"):
            out = sin(scaled) / scaled
        return np.where(v == 0.0, 1.0, out)

    inside = (x >= -_SUPPORT) & (x < _SUPPORT)
    return np.where(inside, sinc(x) * sinc(x / 3), 0.0)


def _math_sin(values: np.ndarray) -> np.ndarray:
    return np.array([math.sin(v) for v in values.ravel()], dtype=np.float64).reshape(values.shape)


def _normalised(weights: np.ndarray, valid: np.ndarray) -> np.ndarray:
    # Pillow sums the weights tap by tap: a cumulative sum keeps that order (np.sum pairs them).
    total = np.cumsum(weights, axis=1)[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(total != 0.0, weights / total, weights)
    return np.where(valid, out, 0.0)


@functools.lru_cache(maxsize=64)
def coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, int]:
    """Pillow's integer coefficients for resampling ``in_size`` pixels to ``out_size`` (the
    whole image as the box), as a float64 (out_size, span) matrix over the input pixels
    [first, first + span) that any output reads; returns (matrix, first)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    centers = (np.arange(out_size, dtype=np.float64) + 0.5) * scale  # in0 = 0.0
    xmin = np.maximum((centers - support + 0.5).astype(np.int64), 0)  # C's (int): toward zero
    xmax = np.minimum((centers + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)
    valid = taps[None, :] < xmax[:, None]
    args = ((taps[None, :] + xmin[:, None]) - centers[:, None] + 0.5) * (1.0 / filterscale)
    kk = _normalised(np.where(valid, _lanczos(args), 0.0), valid)
    near_tie = np.abs(np.abs(kk * _ONE) % 1.0 - 0.5) < _TIE_MARGIN
    rows = np.flatnonzero(near_tie.any(axis=1))
    if rows.size:  # exactly as the C library computes them, for the few rows that need it
        kk[rows] = _normalised(np.where(valid[rows], _lanczos(args[rows], _math_sin), 0.0), valid[rows])
    # normalize_coeffs_8bpc: (int)(x * 2**22 +- 0.5), truncating toward zero
    fixed = np.trunc(np.where(kk < 0, kk * _ONE - 0.5, kk * _ONE + 0.5))
    first = int(xmin.min())
    span = int((xmin + xmax).max()) - first
    matrix = np.zeros((out_size, span), dtype=np.float64)
    for row in range(out_size):
        start, count = int(xmin[row]) - first, int(xmax[row])
        matrix[row, start:start + count] = fixed[row, :count]
    matrix.setflags(write=False)
    return matrix, first


def _clip8(sums: np.ndarray) -> np.ndarray:
    """Pillow's ``clip8`` of ``2**21 + sum``: the integer part of the fixed point, in [0, 255]."""
    return np.clip(np.floor((sums + _HALF) / _ONE), 0, 255).astype(np.uint8)


def _horizontal(pixels: np.ndarray, widths: Sequence[int]) -> list[np.ndarray]:
    """One horizontal pass per output width, all in one matrix product."""
    mats = [coefficients(pixels.shape[1], width) for width in widths]
    first = min(start for _, start in mats)
    end = max(start + matrix.shape[1] for matrix, start in mats)
    stacked = np.zeros((end - first, sum(widths)), dtype=np.float64)
    column = 0
    for matrix, start in mats:
        stacked[start - first:start - first + matrix.shape[1], column:column + matrix.shape[0]] = matrix.T
        column += matrix.shape[0]
    sums = pixels[:, first:end].astype(np.float64) @ stacked
    bounds = np.cumsum([0, *widths])
    return [_clip8(sums[:, bounds[i]:bounds[i + 1]]) for i in range(len(widths))]


def _vertical(pixels: np.ndarray, height: int) -> np.ndarray:
    matrix, first = coefficients(pixels.shape[0], height)
    return _clip8(matrix @ pixels[first:first + matrix.shape[1]].astype(np.float64))


def _pillow_vertical_first(in_size: tuple[int, int], out_size: tuple[int, int]) -> bool:
    """Whether Pillow runs the vertical pass first for this resize (both passes needed)."""
    (width, height), (out_w, out_h) = in_size, out_size
    return _VERTICAL_FIRST_RULE and height - out_h > 0 and height - out_h > (width - out_w) * 2


def lanczos_grey(grey: Image.Image | np.ndarray, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """``np.asarray(grey.resize(size, Image.Resampling.LANCZOS))`` for each (width, height) in
    ``sizes``, bit for bit, for an 8-bit greyscale image (mode ``L`` or a 2-D uint8 array)."""
    pixels = np.asarray(grey)
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(f"expected an 8-bit greyscale image, got {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape
    for out_w, out_h in sizes:
        if out_w < 1 or out_h < 1:
            raise ValueError(f"size {out_w}x{out_h} is empty")
    horizontal_first = [i for i, size in enumerate(sizes) if size[0] != width
                        and not (size[1] != height and _pillow_vertical_first((width, height), size))]
    results: dict[int, np.ndarray] = {}
    if horizontal_first:
        passes = _horizontal(pixels, [sizes[i][0] for i in horizontal_first])
        for index, rows in zip(horizontal_first, passes, strict=True):
            out_h = sizes[index][1]
            results[index] = _vertical(rows, out_h) if out_h != height else rows
    for index, (out_w, out_h) in enumerate(sizes):
        if index in results:
            continue
        out = _vertical(pixels, out_h) if out_h != height else pixels.copy()
        results[index] = _horizontal(out, [out_w])[0] if out_w != width else out
    return [results[i] for i in range(len(sizes))]


def _probe() -> tuple[bool, bool]:
    """(vertical-first rule, matches): whether the installed Pillow runs the vertical pass first
    where it shrinks the height much more than the width, and whether this module reproduces
    it at all, from a 2 x 40 probe whose two pass orders give different pixels."""
    global _VERTICAL_FIRST_RULE
    probe = (np.arange(80, dtype=np.uint32) * 97 % 251).astype(np.uint8).reshape(40, 2)
    expected = np.asarray(Image.fromarray(probe).resize((3, 7), Image.Resampling.LANCZOS))
    outputs = []
    for rule in (True, False):
        _VERTICAL_FIRST_RULE = rule
        outputs.append(lanczos_grey(probe, [(3, 7)])[0])
    vertical, horizontal = outputs
    if np.array_equal(expected, vertical) and not np.array_equal(vertical, horizontal):
        return True, True
    return False, bool(np.array_equal(expected, horizontal))


_VERTICAL_FIRST_RULE = True
#: False when the installed Pillow resamples in a way this module does not reproduce (then
#: callers use Pillow itself): checked once at import on a probe image.
_VERTICAL_FIRST_RULE, AVAILABLE = _probe()
