"""Signs of editing (step ``tamper``) - WEAK evidence, never proof.

Two signals:

* **EXIF Software**: the file says it was saved by an image editor (Photoshop, GIMP, ...).
  Most honest product photos are edited too (cropping, white balance), so on its own this
  only adds context for a reviewer; it raises a flag with a low score.
* **Error level analysis (JPEG only)**: the image is re-saved at a known quality and the
  difference is measured per 16x16 block. A region pasted from another picture was
  compressed a different number of times and often stands out from the rest. The statistic
  is the strongest block's error over the median block's; ``tamper_ela_threshold`` sets the
  cut. Sharp edges, text and high-contrast logos raise it too, hence the low weight.
"""

from __future__ import annotations

import io
import re
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageChops

from worker.config import Settings
from worker.fraud.jpeg import estimate_quality
from worker.pipeline.contract import Flag, ImageContext, StepResult

EDITORS = re.compile(
    r"photoshop|gimp|lightroom|affinity|pixelmator|paint\.net|canva|picsart|snapseed|"
    r"facetune|photopea|fotor|meitu|krita|corel|paintshop", re.IGNORECASE)
EXIF_SOFTWARE = 0x0131
ELA_QUALITY = 90
ELA_MAX_SIDE = 1024
BLOCK = 16


def editor_software(raw: bytes) -> str | None:
    try:
        exif = Image.open(io.BytesIO(raw)).getexif()
    except Exception:  # noqa: BLE001 - unreadable EXIF of any kind just means "no editor named"
        return None
    software = exif.get(EXIF_SOFTWARE)
    if isinstance(software, bytes):
        software = software.decode("latin-1", "replace")
    if software and EDITORS.search(str(software)):
        return str(software).strip()
    return None


def ela_copy(image: Image.Image) -> Image.Image:
    """The photo shrunk to at most ``ELA_MAX_SIDE`` as ``ImageContext.reduced`` makes it from
    the photo itself (Pillow's bilinear, ``reducing_gap=2``; the photo itself when it fits).
    The step takes ``ctx.reduced(ELA_MAX_SIDE)``, the copy segmentation analyses too."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if max(rgb.size) <= ELA_MAX_SIDE:
        return rgb
    scale = ELA_MAX_SIDE / max(rgb.size)
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    return rgb.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def error_level(image: Image.Image, reduced: Image.Image | None = None) -> dict[str, Any]:
    """Block error levels after one more JPEG round trip at ``ELA_QUALITY``, measured on the
    photo shrunk to at most ``ELA_MAX_SIDE`` (the statistic is about regions, not pixels):
    :func:`ela_copy`, or ``reduced`` when given (a copy of that size made otherwise)."""
    rgb = ela_copy(image) if reduced is None else reduced
    if rgb.mode != "RGB":
        rgb = rgb.convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=ELA_QUALITY)
    again = Image.open(buf)
    again.load()
    # |a - b| per channel in C, then the exact integer sum of each 16x16 block over the three
    # channels (rows of 16 * 3 bytes): the block means are those of the per-pixel channel
    # means, without rounding.
    diff = np.asarray(ImageChops.difference(rgb, again if again.mode == "RGB" else again.convert("RGB")))
    h, w = (diff.shape[0] // BLOCK) * BLOCK, (diff.shape[1] // BLOCK) * BLOCK
    if h == 0 or w == 0:
        return {"ratio": 0.0}
    rows = diff[:h, :w].reshape(h // BLOCK, BLOCK, w * 3).sum(axis=1, dtype=np.uint16)
    blocks = rows.reshape(h // BLOCK, w // BLOCK, BLOCK * 3).sum(axis=2, dtype=np.int64) / (3.0 * BLOCK * BLOCK)
    median = float(np.median(blocks))
    top = float(np.percentile(blocks, 99.5))
    iy, ix = np.unravel_index(int(np.argmax(blocks)), blocks.shape)
    scale = image.width / rgb.width
    return {
        "ratio": round(top / max(median, 0.25), 3),
        "median_error": round(median, 3),
        "top_error": round(top, 3),
        "strongest_block": [round(float(v * scale), 1) for v in
                            (ix * BLOCK, iy * BLOCK, (ix + 1) * BLOCK, (iy + 1) * BLOCK)],
    }


class TamperStep:
    name: ClassVar[str] = "tamper"
    requires: ClassVar[tuple[str, ...]] = ()
    # @2: ELA on the shared bilinear copy ctx.reduced(1024) (@1: its own Lanczos copy): the same
    # figures for photos up to 1024 px, the ratio within 7 % (p5-p95) above.
    VERSION: ClassVar[str] = "tamper@2:ela-q90-bilinear1024+exif-software"

    def version(self, settings: Settings) -> str:
        """A rules-only step: the version changes when its rules do."""
        return self.VERSION

    def run(self, ctx: ImageContext) -> StepResult:
        software = editor_software(ctx.raw)
        data: dict[str, Any] = {"software": software}
        reasons, score = [], 0.0
        if ctx.source_format == "JPEG":
            # The reduced copy segmentation analyses too (made once per image, whichever runs first).
            ela = error_level(ctx.image, ctx.reduced(ELA_MAX_SIDE)[0])
            data["ela"] = ela
            data["jpeg_quality"] = estimate_quality(ctx.raw)
            if ela["ratio"] >= ctx.settings.tamper_ela_threshold:
                reasons.append(f"one region re-compresses {ela['ratio']:.1f}x worse than the median "
                               f"(error level analysis, strongest block at {ela['strongest_block']})")
                score = max(score, min(0.6, 0.3 + 0.05 * (ela["ratio"] - ctx.settings.tamper_ela_threshold)))
        if software:
            reasons.append(f"the file was saved by an image editor ({software})")
            score = max(score, 0.2)
        if not reasons:
            return StepResult(data=data)
        evidence = {**data, "weak_evidence": True,
                    "summary": "Possible editing (weak evidence, check the photo): " + "; ".join(reasons) + "."}
        return StepResult(flags=[Flag("tampered", round(score, 3), evidence)], data=data)
