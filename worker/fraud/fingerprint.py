"""Several 64-bit perceptual hashes per image, so that one edit cannot hide a copy.

A single global pHash survives resizing, re-compression, brightness/contrast changes and
(through a hash of the mirrored query) flips, but not borders or crops: both move the
content inside the frame. So each image is hashed in several *views*:

* ``full``   - the image as uploaded (scaled to 512 px on the longer side first);
* ``trim``   - after cutting away uniform borders (padding, letterboxing, frames);
* ``cNN``    - central crops keeping NN % of each side, so that a copy cropped by up to
  15 % still has a view that lines up with one of the original's views.

Stored images keep their unmirrored views; a query also hashes its mirror image, which
finds flipped copies without doubling the index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from worker.io.hashing import dhash, phash

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
WORKING_SIDE = 512


@dataclass(frozen=True)
class HashValue:
    kind: str  # phash | dhash
    view: str  # full | trim | c85 | c70
    mirrored: bool
    value: int  # unsigned 64-bit


def trim_borders(image: Image.Image, tolerance: float = 12.0, max_fraction: float = 0.4) -> Image.Image:
    """Cut away rows/columns at the edges that are (nearly) one colour.

    An edge line counts as border while its pixels stay within ``tolerance`` grey levels of
    the corner colour; at most ``max_fraction`` of each side is removed, so a photo of a
    white product on a white background loses its margin but never its content.
    """
    grey = np.asarray(image if image.mode == "L" else image.convert("L"), dtype=np.float32)
    h, w = grey.shape
    if h < 16 or w < 16:
        return image

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
    if top + bottom + left + right == 0:
        return image
    return image.crop((left, top, w - right, h - bottom))


def centre_crop(image: Image.Image, keep: float) -> Image.Image:
    w, h = image.size
    dx, dy = round(w * (1 - keep) / 2), round(h * (1 - keep) / 2)
    return image.crop((dx, dy, w - dx, h - dy))


def views(image: Image.Image, anchored: bool = True, query: bool = False) -> dict[str, Image.Image]:
    """The views to hash, as grey images (the hashes look at grey pixels only: converting the
    working copy once gives the very pixels converting every crop did)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if max(image.size) > WORKING_SIDE:
        # Hashes look at 32x32 pixels: one downscale up front keeps 30 hashes of a 24 MP
        # photo cheap, and stored and query images go through the same path.
        image = image.copy()
        image.thumbnail((WORKING_SIDE, WORKING_SIDE), Image.Resampling.LANCZOS)
    image = image.convert("L")
    out = {"full": image}
    trimmed = trim_borders(image)
    if trimmed.size != image.size:
        out["trim"] = trimmed
    base = trimmed
    for keep in CENTRE_CROPS:
        out[f"c{round(keep * 100)}"] = centre_crop(base, keep)
    if anchored:
        out.update(anchored_crops(base, ANCHORED_CUT, "cut_"))
    if query:
        for keep in QUERY_CENTRE_CROPS:
            out[f"qc{round(keep * 100)}"] = centre_crop(base, keep)
        out.update(anchored_crops(base, QUERY_CUT, "qcut_"))
    return out


def anchored_crops(base: Image.Image, cut: float, prefix: str) -> dict[str, Image.Image]:
    """``cut`` taken off each side, and off each pair of adjacent sides (the corners)."""
    w, h = base.size
    cx, cy = round(w * cut), round(h * cut)
    return {
        f"{prefix}left": base.crop((cx, 0, w, h)),
        f"{prefix}right": base.crop((0, 0, w - cx, h)),
        f"{prefix}top": base.crop((0, cy, w, h)),
        f"{prefix}bottom": base.crop((0, 0, w, h - cy)),
        f"{prefix}tl": base.crop((cx, cy, w, h)),
        f"{prefix}tr": base.crop((0, cy, w - cx, h)),
        f"{prefix}bl": base.crop((cx, 0, w, h - cy)),
        f"{prefix}br": base.crop((0, 0, w - cx, h - cy)),
    }


def _hashes_of(img: Image.Image) -> dict[str, int]:
    return {"phash": phash(img), "dhash": dhash(img)}


def fingerprint(image: Image.Image, *, mirrored: bool = False, query: bool = False) -> list[HashValue]:
    """All view hashes of an image. ``query`` adds the query-only crops (``qcut_*``) and the
    mirror image of the whole and central views (stored images keep unmirrored views)."""
    out: list[HashValue] = []
    mirrored = mirrored or query
    for view, img in views(image, query=query).items():
        for kind, value in _hashes_of(img).items():
            out.append(HashValue(kind, view, False, value))
        if mirrored and "cut_" not in view:
            # A mirrored crop is found through the mirror of the query's whole image; the
            # mirrored off-centre crops would only serve "crop stored first, mirrored original
            # later" and cost a third of the index probes.
            for kind, value in _hashes_of(ImageOps.mirror(img)).items():
                out.append(HashValue(kind, view, True, value))
    return out


def stored_part(hashes: list[HashValue]) -> list[HashValue]:
    """The hashes an image keeps in the index: unmirrored, no query-only views."""
    return [h for h in hashes if not h.mirrored and not h.view.startswith("q")]
