"""Colours of a segmented product: dominant colours by k-means in CIE Lab, each named from a
small table of the colour names shoppers filter by, and how plain the background is.

Inputs are pixel lists (N, 3) uint8 RGB of at most about ``SAMPLE_POINTS`` pixels: the
segmentation step picks them on a regular grid over its analysis copy
(:func:`grid_positions`), and a longer list is thinned to evenly spaced rows
(:func:`sample_index`). Nothing is random: k-means starts from principal-axis splits of the
points (:func:`split_centres`), so the colours are a function of the pixels alone.

Why (colours@2): k-means++ from a random start on a random sample named other colours when
only the seed changed (7 of 19 test photos, shares up to 0.36 apart), on a 512 px instead of
a 1024 px analysis copy (4 of 19) and for a mask computed from torch's instead of Pillow's
resize (4 of 19). With the grid and the deterministic start: 0 of 19 for the copy size and
the model input, shares within 0.015; on another 19 (the bench photos and products on plain
backgrounds), at 512 px: 1 of 19, a cluster on the dark grey / grey border (colours@1: 6 of
19, shares up to 0.39 apart). Moving the grid by a fraction of a cell (not something
the step does: the grid is fixed) still renames a cluster on 2 of 19, whose centre lies on the
border between two names (green / lime, light grey / beige; the clusters' shares within 0.01):
naming by the nearest anchor has such borders whatever the clustering.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

#: Pixels k-means and the background score look at (about this many: a grid, or evenly spaced).
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


def split_centres(data: np.ndarray, k: int) -> np.ndarray:
    """A deterministic k-means start: the points as one group, then, until there are ``k``
    groups, the group with the largest sum of squared distances to its mean is cut in two
    across its principal axis, through its mean. The starts are the groups' means (fewer
    than ``k`` when the points hold fewer distinct colours). Unlike a k-means++ draw, this
    moves little when the points move little, so Lloyd's iterations end in the same optimum."""
    planar = np.ascontiguousarray(data.T, dtype=np.float64)  # (3, n): a contiguous row per channel

    def group(members: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """(members, mean, centred points (3, m), sum of squared distances to the mean)."""
        points = planar[:, members]
        mean = points.mean(1)
        points -= mean[:, None]
        return members, mean, points, float(np.einsum("ij,ij->", points, points))

    groups = [group(np.arange(planar.shape[1]))]
    while len(groups) < k:
        worst = max(range(len(groups)), key=lambda i: groups[i][3])  # the first of equals
        members, _, centred, spread = groups[worst]
        if spread <= 0.0:
            break
        axis = np.linalg.eigh(centred @ centred.T)[1][:, -1]  # principal axis
        side = axis @ centred > 0
        if side.all() or not side.any():
            break
        groups[worst:worst + 1] = [group(members[~side]), group(members[side])]
    return np.stack([g[1] for g in groups]).astype(np.float32)


def _lloyd(data: np.ndarray, planar: np.ndarray, centres: np.ndarray,
           iterations: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Lloyd's iterations from ``centres``: (centres, assignment, inertia minus the points'
    own squared norms)."""
    n, count = len(data), len(centres)
    labels = np.arange(count)[:, None]

    def nearest(centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # |p - c|^2 without the per-point |p|^2 (the same for every centre): argmin unchanged.
        distance = (centres * centres).sum(1)[:, None] - 2.0 * (centres @ planar)
        assign = np.zeros(n, dtype=np.int64)
        best = distance[0].copy()
        for j in range(1, count):  # first minimum wins ties, like argmin
            closer = distance[j] < best
            assign[closer] = j
            np.minimum(best, distance[j], out=best)
        return assign, best

    for _ in range(iterations):
        assign, _ = nearest(centres)
        onehot = (assign == labels).astype(np.float32)
        counts = onehot.sum(1)[:, None]
        moved = np.where(counts > 0, (onehot @ data) / np.maximum(counts, 1.0), centres).astype(np.float32)
        converged = bool(np.all(np.abs(moved - centres) <= 1e-3 + 1e-5 * np.abs(centres)))
        centres = moved
        if converged:
            break
    assign, best = nearest(centres)
    return centres, assign, float(best.sum(dtype=np.float64))


def kmeans(points: torch.Tensor, k: int, iterations: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic k-means: Lloyd's iterations from :func:`split_centres`; returns
    (centres, assignment).

    No random start, and only one: keeping the best of several k-means++ starts reaches a
    lower inertia on a few photos (the bisecting start ends in the optimum of the best of
    eight on 12 of the 18 test products, at most 5 % above it on the others; 11 % and 25 %
    on two of the unmasked half photos of the tests) but picks between near-equal optima
    that a 512 px copy orders otherwise (shares 0.24 apart on one of 19 photos, against
    0.015 from the bisecting start alone).
    In numpy on a planar copy of the points, the work of an iteration in a handful of
    whole-array operations. Stops when no centre moves by more than 1e-3 (+1e-5 relative)
    or after ``iterations``; an empty cluster keeps its centre."""
    data = np.ascontiguousarray(points.numpy(), dtype=np.float32)
    planar = np.ascontiguousarray(data.T)  # (3, n): one contiguous row per channel
    centres, assign, _ = _lloyd(data, planar, split_centres(data, min(k, len(data))), iterations)
    return torch.from_numpy(centres), torch.from_numpy(assign)


def grid_positions(region: np.ndarray, max_points: int = SAMPLE_POINTS) -> np.ndarray:
    """Flat indices of the ``True`` pixels of ``region`` ((h, w) bool) that k-means and the
    background score look at: all of them when there are at most ``max_points``, else
    those at the centres of a square grid whose step (sqrt(count / max_points) pixels) puts
    about ``max_points`` of them in the region. The grid depends on the map's size and the
    region's area only, not on a seed: on a copy of the photo at another size it falls on
    the same places of the photo."""
    count = int(np.count_nonzero(region))
    if count <= max_points:
        return np.flatnonzero(region)
    height, width = region.shape
    step = math.sqrt(count / max_points)
    ys = ((np.arange(math.ceil(height / step)) + 0.5) * step).astype(np.int64)
    xs = ((np.arange(math.ceil(width / step)) + 0.5) * step).astype(np.int64)
    ys, xs = ys[ys < height], xs[xs < width]
    rows, cols = np.nonzero(region[np.ix_(ys, xs)])
    return ys[rows] * width + xs[cols]


def sample_index(count: int, max_points: int = SAMPLE_POINTS) -> slice | np.ndarray:
    """Which of ``count`` rows :func:`sample` keeps: all of them, or ``max_points`` evenly
    spaced ones (O(max_points), whatever ``count``; no seed)."""
    if count > max_points:
        return np.arange(max_points, dtype=np.int64) * count // max_points
    return slice(None)


def sample(pixels: np.ndarray, max_points: int) -> torch.Tensor:
    """At most ``max_points`` rows of ``pixels`` ((N, 3) uint8 RGB), evenly spaced
    (:func:`sample_index`), as (n, 3) float32 in [0, 1]."""
    pixels = pixels[sample_index(len(pixels), max_points)]
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)


def dominant_colours(pixels: np.ndarray, k: int, max_points: int = SAMPLE_POINTS) -> list[dict[str, Any]]:
    """(N, 3) uint8 RGB foreground pixels -> named colours with their share, largest first
    (clusters whose centres have the same name are one colour: shares added, Lab averaged)."""
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
    at most ``max_points`` evenly spaced pixels)."""
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
