"""Several 64-bit perceptual hashes per image, so that one edit cannot hide a copy.

A single global pHash survives resizing, re-compression, brightness/contrast changes and
(through a hash of the mirrored query) flips, but not borders or crops: both move the
content inside the frame. So each image is hashed in several *views*:

* ``full``   - the image as uploaded;
* ``trim``   - after cutting away uniform borders (padding, letterboxing, frames);
* ``cNN``    - central crops keeping NN % of each side, so that a copy cropped by up to
  15 % still has a view that lines up with one of the original's views.

Stored images keep their unmirrored views; a query also hashes its mirror image, which
finds flipped copies without doubling the index.

Every view is a box on one grey working copy of the photo (``WORKING_SIDE`` px on the longer
side, Lanczos from the full-resolution grey copy). Each box is resampled to 32x32 (pHash) and
9x8 (dHash) with Pillow's Lanczos filter written as weight matrices (a matrix product per
pass, the horizontal one shared by the boxes over the same columns, no crop copies) and
rounded to whole grey levels, as an 8-bit image would be; a mirrored view is the mirror image
of its resampled box. ``VALUES`` names this recipe:
hashes made by another recipe are only near those of this one (see
``worker.fraud.duplicates.DuplicatesStep.VERSION``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from worker.io.hashing import _dct_matrix

HASH_KINDS = ("phash", "dhash")
# Central crops kept per image, as the fraction of each side that is kept.
CENTRE_CROPS = (0.85, 0.7)
# Off-centre crops: this fraction cut from one side, or from two adjacent sides (a corner).
ANCHORED_CUT = 0.15
# Query-only crops halfway to the stored ones: a copy cropped by ~8 % plus this cut lines up
# with a stored 15 % crop. Computed for each new image, never stored (no index cost).
QUERY_CUT = 0.075
# Query-only central crops: a copy keeping 90-95 % lines up with the stored c85 through them.
QUERY_CENTRE_CROPS = (0.95, 0.9)
# The grey working copy every view is cut from. The hashes look at 32x32 (pHash) and 9x8
# (dHash) pixels: the smallest view (c70) still has ~180 px on its longer side.
WORKING_SIDE = 256
# The recipe of the hash values (see the module doc); part of the duplicates step's version.
VALUES = f"grey-lanczos{WORKING_SIDE}-boxes"

Box = tuple[int, int, int, int]  # left, top, right, bottom (right and bottom excluded)


@dataclass(frozen=True)
class HashValue:
    kind: str  # phash | dhash
    view: str  # full | trim | c85 | c70
    mirrored: bool
    value: int  # unsigned 64-bit


def working_copy(image: Image.Image) -> Image.Image:
    """The grey copy the views are cut from: longer side at most ``WORKING_SIDE`` (Lanczos,
    after an integer box reduction down to at least 1.5 times the size: ``reducing_gap=1.5``)."""
    grey = image if image.mode == "L" else image.convert("L")
    width, height = grey.size
    if max(width, height) <= WORKING_SIDE:
        return grey
    scale = WORKING_SIDE / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return grey.resize(size, Image.Resampling.LANCZOS, reducing_gap=1.5)


def trim_box(image: Image.Image, tolerance: float = 12.0, max_fraction: float = 0.4) -> Box:
    """The box left after cutting away rows/columns at the edges that are (nearly) one colour.

    An edge line counts as border while its pixels stay within ``tolerance`` grey levels of
    the corner colour; at most ``max_fraction`` of each side is removed, so a photo of a
    white product on a white background loses its margin but never its content.
    """
    grey = np.asarray(image if image.mode == "L" else image.convert("L"), dtype=np.float32)
    h, w = grey.shape
    if h < 16 or w < 16:
        return 0, 0, w, h

    def run_length(lines: np.ndarray, limit: int) -> int:
        # lines: (n, k) the edge lines ordered from the outside in
        ref = np.median(lines[0])
        count = 0
        for line in lines[:limit]:
            if np.percentile(np.abs(line - ref), 98) > tolerance:
                break
            count += 1
        return count

    top = run_length(grey, int(h * max_fraction))
    bottom = run_length(grey[::-1], int(h * max_fraction))
    left = run_length(grey.T, int(w * max_fraction))
    right = run_length(grey.T[::-1], int(w * max_fraction))
    return left, top, w - right, h - bottom


def trim_borders(image: Image.Image, tolerance: float = 12.0, max_fraction: float = 0.4) -> Image.Image:
    """``image`` cropped to its :func:`trim_box` (the image itself when nothing is cut)."""
    box = trim_box(image, tolerance, max_fraction)
    return image if box == (0, 0, *image.size) else image.crop(box)


def centre_box(box: Box, keep: float) -> Box:
    """The central part of ``box`` keeping ``keep`` of each side."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    dx, dy = round(w * (1 - keep) / 2), round(h * (1 - keep) / 2)
    return x0 + dx, y0 + dy, x1 - dx, y1 - dy


def anchored_boxes(box: Box, cut: float, prefix: str) -> dict[str, Box]:
    """``cut`` taken off each side of ``box``, and off each pair of adjacent sides (the corners)."""
    x0, y0, x1, y1 = box
    cx, cy = round((x1 - x0) * cut), round((y1 - y0) * cut)
    return {
        f"{prefix}left": (x0 + cx, y0, x1, y1),
        f"{prefix}right": (x0, y0, x1 - cx, y1),
        f"{prefix}top": (x0, y0 + cy, x1, y1),
        f"{prefix}bottom": (x0, y0, x1, y1 - cy),
        f"{prefix}tl": (x0 + cx, y0 + cy, x1, y1),
        f"{prefix}tr": (x0, y0 + cy, x1 - cx, y1),
        f"{prefix}bl": (x0 + cx, y0, x1, y1 - cy),
        f"{prefix}br": (x0, y0, x1 - cx, y1 - cy),
    }


def view_boxes(working: Image.Image, anchored: bool = True, query: bool = False) -> dict[str, Box]:
    """The views to hash, as boxes on the working copy."""
    full: Box = (0, 0, *working.size)
    out = {"full": full}
    base = trim_box(working)
    if base != full:
        out["trim"] = base
    for keep in CENTRE_CROPS:
        out[f"c{round(keep * 100)}"] = centre_box(base, keep)
    if anchored:
        out.update(anchored_boxes(base, ANCHORED_CUT, "cut_"))
    if query:
        for keep in QUERY_CENTRE_CROPS:
            out[f"qc{round(keep * 100)}"] = centre_box(base, keep)
        out.update(anchored_boxes(base, QUERY_CUT, "qcut_"))
    return out


def views(image: Image.Image, anchored: bool = True, query: bool = False) -> dict[str, Image.Image]:
    """The views to hash, as grey images cut from the working copy (for inspection; the
    hashes are computed from the boxes without cutting)."""
    working = working_copy(image)
    return {name: working.crop(box) for name, box in view_boxes(working, anchored, query).items()}


@functools.lru_cache(maxsize=1024)
def lanczos_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) weights of Pillow's Lanczos resampling along one axis: output
    pixel i centred on input coordinate (i + 0.5) * in/out, the kernel sinc(x) sinc(x/3) on
    |x| < 3 stretched by the scale when shrinking, each row normalised to sum 1."""
    scale = in_size / out_size
    support = max(scale, 1.0)
    taps = int(np.ceil(3.0 * support)) * 2 + 2
    centre = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    first = np.floor(centre - 3.0 * support).astype(np.int64)
    index = first[:, None] + np.arange(taps)[None, :]  # every input pixel the kernel reaches
    x = (index + 0.5 - centre[:, None]) / support
    inside = (np.abs(x) < 3.0) & (index >= 0) & (index < in_size)
    x = np.where(inside, x, 1.0)
    kernel = np.where(inside, np.sinc(x) * np.sinc(x / 3.0), 0.0)
    weights = np.zeros((out_size, in_size))
    rows = np.broadcast_to(np.arange(out_size)[:, None], index.shape)
    weights[rows[inside], index[inside]] = kernel[inside]  # a row's taps are distinct pixels
    weights /= weights.sum(axis=1, keepdims=True)
    weights.setflags(write=False)
    return weights


_BIT_WEIGHTS = np.left_shift(np.uint64(1), np.arange(63, -1, -1, dtype=np.uint64))


def _as_ints(bits: np.ndarray) -> list[int]:
    """(n, 64) booleans (row-major, first bit most significant) -> n unsigned integers."""
    return [int(v) for v in (bits.astype(np.uint64) * _BIT_WEIGHTS).sum(axis=1, dtype=np.uint64)]


def _hash_boxes(pixels: np.ndarray, boxes: list[Box], mirrored: list[bool]) -> list[tuple[int, int]]:
    """(pHash, dHash) of each box of the grey ``pixels``, then of the mirror image of each box
    whose ``mirrored`` entry is true (in that order)."""
    small = np.empty((len(boxes), 32, 32))
    grads = np.empty((len(boxes), 8, 9))
    by_columns: dict[tuple[int, int], list[int]] = {}
    for i, (x0, _, x1, _) in enumerate(boxes):
        by_columns.setdefault((x0, x1), []).append(i)
    for (x0, x1), members in by_columns.items():
        # The horizontal pass, shared by the boxes over the same columns: (rows, 32 + 9).
        top, bottom = min(boxes[i][1] for i in members), max(boxes[i][3] for i in members)
        cols = np.concatenate([lanczos_weights(x1 - x0, 32), lanczos_weights(x1 - x0, 9)])
        rows = pixels[top:bottom, x0:x1] @ cols.T
        for i in members:
            y0, y1 = boxes[i][1] - top, boxes[i][3] - top
            small[i] = lanczos_weights(y1 - y0, 32) @ rows[y0:y1, :32]
            grads[i] = lanczos_weights(y1 - y0, 8) @ rows[y0:y1, 32:]
    flip = [i for i, m in enumerate(mirrored) if m]
    small = np.concatenate([small, small[flip, :, ::-1]])
    grads = np.concatenate([grads, grads[flip, :, ::-1]])
    # Whole grey levels, as an 8-bit image would hold: flat regions compare equal (no bits
    # from rounding noise) and the values stay those of an 8-bit resize but for the rounding.
    small = np.clip(np.rint(small), 0, 255)
    grads = np.clip(np.rint(grads), 0, 255)
    dct = _dct_matrix(32)[:8]
    coeffs = (dct @ small @ dct.T).reshape(len(small), 64)
    median = np.median(coeffs[:, 1:], axis=1, keepdims=True)  # DC excluded, as in worker.io.hashing
    phashes = _as_ints(coeffs > median)
    dhashes = _as_ints((grads[:, :, 1:] > grads[:, :, :-1]).reshape(len(grads), 64))
    return list(zip(phashes, dhashes, strict=True))


def fingerprint(image: Image.Image, *, mirrored: bool = False, query: bool = False) -> list[HashValue]:
    """All view hashes of an image (RGB, or its grey copy: only grey levels are hashed).
    ``query`` adds the query-only crops (``qcut_*``) and the mirror image of the whole and
    central views (stored images keep unmirrored views)."""
    mirrored = mirrored or query
    working = working_copy(image)
    boxes = view_boxes(working, query=query)
    names = list(boxes)
    # A mirrored crop is found through the mirror of the query's whole image; the mirrored
    # off-centre crops would only serve "crop stored first, mirrored original later" and cost
    # a third of the index probes.
    flip = [mirrored and "cut_" not in name for name in names]
    pairs = _hash_boxes(np.asarray(working, dtype=np.float64), list(boxes.values()), flip)
    keys = [(name, False) for name in names] + [(name, True) for name, f in zip(names, flip, strict=True) if f]
    by_key = dict(zip(keys, pairs, strict=True))
    out: list[HashValue] = []
    for name, f in zip(names, flip, strict=True):
        for view_mirrored in ((False, True) if f else (False,)):
            values = by_key[(name, view_mirrored)]
            out += [HashValue(kind, name, view_mirrored, value) for kind, value in zip(HASH_KINDS, values, strict=True)]
    return out


def stored_part(hashes: list[HashValue]) -> list[HashValue]:
    """The hashes an image keeps in the index: unmirrored, no query-only views."""
    return [h for h in hashes if not h.mirrored and not h.view.startswith("q")]
