"""Colours of a segmented product: dominant colours by k-means in CIE Lab, each named from a
small table of the colour names shoppers filter by, and how plain the background is.

Inputs are pixel lists (N, 3) uint8 RGB, sampled down to a fixed number of points
(``SAMPLE_POINTS``, drawn with a fixed seed before any conversion), so the cost does not grow
with the photo: the colours are those of the sample, which on real photos names the same
colours as every pixel would, with shares within a few percent
(tests/worker/steps/test_colours_sample.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

#: Pixels k-means and the background score look at, at most (drawn with a fixed seed).
SAMPLE_POINTS = 8192

# sRGB anchors of the colour names shoppers filter by; matched to clusters in CIE Lab.
NAMED_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "dark grey": (70, 70, 70),
    "grey": (128, 128, 128),
    "light grey": (195, 195, 195),
    "white": (245, 245, 245),
    "red": (200, 25, 30),
    "dark red": (115, 15, 25),
    "pink": (240, 150, 180),
    "magenta": (215, 40, 150),
    "orange": (240, 130, 30),
    "yellow": (245, 215, 40),
    "beige": (225, 205, 165),
    "tan": (190, 150, 100),
    "brown": (115, 70, 35),
    "olive": (120, 120, 40),
    "green": (40, 160, 60),
    "dark green": (20, 80, 35),
    "lime": (160, 215, 60),
    "teal": (20, 128, 128),
    "turquoise": (60, 200, 200),
    "light blue": (140, 190, 235),
    "blue": (35, 80, 200),
    "navy": (20, 30, 90),
    "purple": (110, 40, 140),
    "lavender": (185, 165, 225),
}


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3) sRGB in [0, 1] -> (N, 3) CIE Lab (D65), through kornia."""
    from kornia.color import rgb_to_lab as kornia_rgb_to_lab

    return kornia_rgb_to_lab(rgb.T.reshape(3, -1, 1)).reshape(3, -1).T


_named_lab: tuple[list[str], torch.Tensor] | None = None


def name_colour(lab: torch.Tensor) -> list[str]:
    """Nearest named colour (CIE76 distance in Lab) for each row of ``lab``."""
    global _named_lab
    if _named_lab is None:
        names = list(NAMED_COLOURS)
        table = torch.tensor([NAMED_COLOURS[n] for n in names], dtype=torch.float32) / 255.0
        _named_lab = (names, rgb_to_lab(table))
    names, table = _named_lab
    return [names[i] for i in torch.cdist(lab.float(), table).argmin(1).tolist()]


def kmeans(points: torch.Tensor, k: int, iterations: int = 25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic k-means (k-means++ start); returns (centres, assignment).

    In numpy on a planar copy of the points, with the work of an iteration in a handful of
    whole-array operations (the distances as one matrix product, the new centres as one
    one-hot product), ~2-3x less CPU than torch's ``cdist``/``argmin``/``index_add_`` on
    8192 points: the same algorithm, seed and stopping rule; the sums run in another
    floating-point order, so centres agree with the torch version to ~1e-4 in Lab
    (tests/worker/steps/test_colours_sample.py compares the colours with it)."""
    data = np.ascontiguousarray(points.numpy(), dtype=np.float32)
    generator = torch.Generator().manual_seed(seed)
    n = len(data)
    k = min(k, n)
    planar = np.ascontiguousarray(data.T)  # (3, n): one contiguous row per channel

    def squared_distance(centre: np.ndarray) -> np.ndarray:
        out = planar[0] - centre[0]
        out *= out
        for axis in (1, 2):
            diff = planar[axis] - centre[axis]
            diff *= diff
            out += diff
        return out

    first = int(torch.randint(n, (1,), generator=generator))
    centres = data[[first]]
    nearest = squared_distance(centres[0])
    for _ in range(1, k):
        total = float(nearest.sum())
        if total == 0.0:
            break
        pick = int(torch.multinomial(torch.from_numpy(nearest / total), 1, generator=generator))
        centres = np.concatenate([centres, data[[pick]]])
        np.minimum(nearest, squared_distance(centres[-1]), out=nearest)
    count = len(centres)
    labels = np.arange(count)[:, None]
    assign = np.zeros(n, dtype=np.int64)
    for _ in range(iterations):
        # |p - c|^2 without the per-point |p|^2 (the same for every centre): argmin unchanged.
        distance = (centres * centres).sum(1)[:, None] - 2.0 * (centres @ planar)
        assign = np.zeros(n, dtype=np.int64)
        best = distance[0].copy()
        for j in range(1, count):  # first minimum wins ties, like argmin
            closer = distance[j] < best
            assign[closer] = j
            np.minimum(best, distance[j], out=best)
        # Each centre moves to the mean of its points (an empty cluster keeps its centre).
        onehot = (assign == labels).astype(np.float32)
        counts = onehot.sum(1)[:, None]
        moved = np.where(counts > 0, (onehot @ data) / np.maximum(counts, 1.0), centres).astype(np.float32)
        converged = bool(np.all(np.abs(moved - centres) <= 1e-3 + 1e-5 * np.abs(centres)))
        centres = moved
        if converged:
            break
    return torch.from_numpy(centres), torch.from_numpy(assign)


def sample_index(count: int, max_points: int = SAMPLE_POINTS) -> slice | np.ndarray:
    """Which of ``count`` rows :func:`sample` keeps: all of them, or ``max_points`` drawn
    uniformly with a fixed seed (with replacement: O(max_points), whatever ``count``)."""
    if count > max_points:
        return np.random.default_rng(0).integers(0, count, max_points)
    return slice(None)


def sample(pixels: np.ndarray, max_points: int) -> torch.Tensor:
    """At most ``max_points`` rows of ``pixels`` ((N, 3) uint8 RGB), drawn uniformly with a
    fixed seed (:func:`sample_index`), as (n, 3) float32 in [0, 1]."""
    pixels = pixels[sample_index(len(pixels), max_points)]
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)


def dominant_colours(pixels: np.ndarray, k: int, max_points: int = SAMPLE_POINTS) -> list[dict[str, Any]]:
    """(N, 3) uint8 RGB foreground pixels -> named colours with their share, largest first."""
    if len(pixels) == 0:
        return []
    lab = rgb_to_lab(sample(pixels, max_points))
    centres, assign = kmeans(lab, k)
    shares = torch.bincount(assign, minlength=len(centres)).float() / len(lab)
    merged: dict[str, dict[str, Any]] = {}
    for centre, share, name in zip(centres, shares.tolist(), name_colour(centres), strict=True):
        if share <= 0:
            continue
        entry = merged.setdefault(name, {"name": name, "share": 0.0, "lab": [0.0, 0.0, 0.0]})
        total = entry["share"] + share
        entry["lab"] = [(a * entry["share"] + b * share) / total
                        for a, b in zip(entry["lab"], centre.tolist(), strict=True)]
        entry["share"] = total
    colours = sorted(merged.values(), key=lambda c: -c["share"])
    for colour in colours:
        colour["share"] = round(colour["share"], 4)
        colour["lab"] = [round(v, 1) for v in colour["lab"]]
    return colours


def background_plainness(pixels: np.ndarray, tolerance: float = 12.0,
                         max_points: int = SAMPLE_POINTS) -> dict[str, Any]:
    """How uniform the background is: the share of background pixels within ``tolerance``
    (CIE76 ΔE) of the background's median Lab colour, plus that colour's name (measured on
    a fixed-seed sample of at most ``max_points`` pixels)."""
    if len(pixels) == 0:
        return {"score": None, "reason": "no background visible"}
    lab = rgb_to_lab(sample(pixels, max_points))
    median = lab.median(0).values
    distance = (lab - median).norm(dim=1)
    return {
        "score": round(float((distance <= tolerance).float().mean()), 4),
        "colour": name_colour(median[None])[0],
        "mean_delta_e": round(float(distance.mean()), 2),
    }
