"""Run an image-to-image model over overlapping tiles with bounded memory.

Super-resolution memory grows with the input area (Real-ESRGAN holds several 64-channel
maps at 4x the input size), so large inputs are cut into windows that all have the same
size (so any of them can share a batch), each window is upscaled with ``overlap`` pixels of
real context on every side that has a neighbour, and only the window's centre is kept: the
seam between two windows lies in the middle of their overlap, where both saw at least
``overlap`` pixels of context. Windows touch the image border exactly where the image does,
so border pixels are treated as in an untiled run. Nothing is blended: with enough overlap
the two windows agree at the seam (a model whose receptive field fits inside the overlap,
like waifu2x's 7 px, gives bit-identical output).

Only ``max_batch`` windows and their outputs are alive at once; the result is written into
one uint8 array.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Window:
    """One tile: the input window (y0:y1, x0:x1) and the part of it that is kept."""

    y0: int
    y1: int
    x0: int
    x1: int
    keep_y0: int
    keep_y1: int
    keep_x0: int
    keep_x1: int


def _axis(length: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(start, end, keep_start, keep_end) for one axis."""
    window = min(length, tile + 2 * overlap)
    if window >= length:
        return [(0, length, 0, length)]
    stride = max(1, window - 2 * overlap - 1)  # -1: rounding of starts never eats context
    count = math.ceil((length - window) / stride) + 1
    starts = [round(i * (length - window) / (count - 1)) for i in range(count)]
    seams = [(starts[i] + starts[i - 1] + window) // 2 for i in range(1, count)]
    keep_lo = [0, *seams]
    keep_hi = [*seams, length]
    return [(s, s + window, lo, hi) for s, lo, hi in zip(starts, keep_lo, keep_hi, strict=True)]


def plan_windows(height: int, width: int, tile: int, overlap: int) -> list[Window]:
    """Same-size windows covering the image; kept regions partition it exactly."""
    if tile < 1 or overlap < 0:
        raise ValueError("tile must be >= 1 and overlap >= 0")
    return [
        Window(y0, y1, x0, x1, ky0, ky1, kx0, kx1)
        for y0, y1, ky0, ky1 in _axis(height, tile, overlap)
        for x0, x1, kx0, kx1 in _axis(width, tile, overlap)
    ]


def upscale_tiled(
    image: torch.Tensor,
    run: Callable[[torch.Tensor], torch.Tensor],
    scale: int,
    tile: int = 192,
    overlap: int = 16,
    max_batch: int = 4,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Upscale ``image`` (3, H, W) float in [0, 1] with ``run`` over tiles.

    ``run`` takes a batch (N, 3, h, w) in [0, 1] and returns (N, 3, s*h, s*w). Returns the
    upscaled image as an (s*H, s*W, 3) uint8 array.
    """
    if image.dim() != 3:
        raise ValueError("expected a (3, H, W) tensor")
    _, height, width = image.shape
    out = np.empty((height * scale, width * scale, 3), dtype=np.uint8)
    windows = plan_windows(height, width, tile, overlap)
    for start in range(0, len(windows), max(1, max_batch)):
        group = windows[start : start + max(1, max_batch)]
        batch = torch.stack([image[:, w.y0 : w.y1, w.x0 : w.x1] for w in group])
        result = run(batch)
        expected = (len(group), 3, batch.shape[2] * scale, batch.shape[3] * scale)
        if tuple(result.shape) != expected:
            raise RuntimeError(f"model returned {tuple(result.shape)}, expected {expected}")
        pixels = (result.float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1)
        for w, up in zip(group, pixels.cpu().numpy(), strict=True):
            ty0, ty1 = (w.keep_y0 - w.y0) * scale, (w.keep_y1 - w.y0) * scale
            tx0, tx1 = (w.keep_x0 - w.x0) * scale, (w.keep_x1 - w.x0) * scale
            out[w.keep_y0 * scale : w.keep_y1 * scale, w.keep_x0 * scale : w.keep_x1 * scale] = (
                up[ty0:ty1, tx0:tx1]
            )
        if progress is not None:
            progress(len(group))
    return out
