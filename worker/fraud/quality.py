"""Low-quality photos (step ``quality``): too small, blurred, or compressed to mush.

Not fraud by itself, but stolen photos are often thumbnails scaled up or screenshots
re-compressed many times, and buyers see a poor listing. Three measurements:

* the shorter side in pixels (``quality_min_side``);
* sharpness: variance of the 3x3 Laplacian of the grey image scaled to 512 px on the
  longer side, so the figure does not depend on the upload size (``quality_blur_threshold``).
  A photo thinner than 3 px at that scale (a strip like 1 x 20000) has no measurable
  sharpness: the figure is null and only the size rule applies;
* JPEG quality estimated from the quantisation tables of the file as uploaded
  (``quality_min_jpeg_quality``).
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from worker.config import Settings
from worker.fraud.jpeg import estimate_quality
from worker.pipeline.contract import Flag, ImageContext, StepResult

ANALYSIS_SIDE = 512


def analysis_pixels(image: Image.Image) -> np.ndarray | None:
    """The grey levels the sharpness is measured on: the photo (or its grey copy) scaled to
    ANALYSIS_SIDE on its longer side, as int16; None when that is thinner than 3 px.

    Grey first (a photo's grey copy is shared with other steps), then shrunk with Pillow's
    antialiased bilinear filter: computed by torch's uint8 kernel (within one grey level of
    ``Image.resize(size, BILINEAR)``, about a third less CPU) where a model step has already
    imported torch, else by Pillow (a worker without model steps never loads torch); a photo
    that fits is not resized."""
    scale = ANALYSIS_SIDE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if min(size) < 3:
        return None
    grey = image if image.mode == "L" else image.convert("L")
    if grey.size == size:
        return np.asarray(grey, dtype=np.int16)
    if size[0] > grey.width or size[1] > grey.height or "torch" not in sys.modules:
        return np.asarray(grey.resize(size, Image.Resampling.BILINEAR), dtype=np.int16)
    import torch

    source = torch.from_numpy(np.array(grey, dtype=np.uint8))[None, None]
    shrunk = torch.nn.functional.interpolate(source, size=(size[1], size[0]), mode="bilinear",
                                             antialias=True, align_corners=False)
    return shrunk[0, 0].numpy().astype(np.int16)


def laplacian_variance(image: Image.Image) -> float | None:
    """Variance of the 3x3 Laplacian over the photo scaled to ANALYSIS_SIDE on its longer
    side (:func:`analysis_pixels`); None when the scaled photo is too thin for a 3x3 kernel.
    ``image`` may be the photo or its grey copy (``ctx.shared("grey")``).

    The kernel is kornia's ``laplacian(kernel_size=3)`` (the 8-neighbour one: the 3x3 sum
    minus 9 times the centre) over the pixels whose 3x3 neighbourhood is inside the image,
    computed on whole numbers, and the variance is the unbiased one (``torch.var``)."""
    pixels = analysis_pixels(image)
    if pixels is None:
        return None
    rows = pixels[:-2] + pixels[1:-1] + pixels[2:]  # 3-row sums (int16: at most 765)
    lap = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]  # 3x3 sums, at most 2295
    lap -= 9 * pixels[1:-1, 1:-1]  # the Laplacian, within -2295..2040
    count = lap.size
    if count < 2:
        return 0.0
    # Sums of whole numbers below 2**53 (at most 512 * 512 * 2295**2): exact in float64, in any
    # order, so the BLAS dot product gives the exact sum of squares.
    values = lap.astype(np.float64).ravel()
    total, squares = int(values.sum()), int(values @ values)
    return (count * squares - total * total) / (count * (count - 1))


class QualityStep:
    name: ClassVar[str] = "quality"
    requires: ClassVar[tuple[str, ...]] = ()
    # @2: grey first, then the 512 px bilinear resize (one channel, torch's uint8 kernel; @1
    # resized the RGB photo with Pillow): the Laplacian variance moves by rounding noise only.
    VERSION: ClassVar[str] = "quality@2:size+laplacian(grey-512)+jpeg-qtables"

    def version(self, settings: Settings) -> str:
        """A rules-only step: the version changes when its rules do."""
        return self.VERSION

    def run(self, ctx: ImageContext) -> StepResult:
        s = ctx.settings
        w, h = ctx.image.size
        sharpness = laplacian_variance(ctx.shared("grey", lambda: ctx.image.convert("L")))
        jpeg_q = estimate_quality(ctx.raw) if ctx.source_format == "JPEG" else None
        data: dict[str, Any] = {"width": w, "height": h, "jpeg_quality": jpeg_q,
                                "laplacian_variance": None if sharpness is None else round(sharpness, 2)}
        problems, score = [], 0.0
        if min(w, h) < s.quality_min_side:
            problems.append(f"tiny ({w}x{h} px, under {s.quality_min_side} px)")
            score = max(score, 0.6)
        if sharpness is not None and sharpness < s.quality_blur_threshold:
            problems.append(f"blurred (Laplacian variance {sharpness:.0f} < {s.quality_blur_threshold:.0f})")
            score = max(score, 0.5 + 0.5 * (1 - sharpness / max(s.quality_blur_threshold, 1e-6)))
        if jpeg_q is not None and jpeg_q < s.quality_min_jpeg_quality:
            problems.append(f"heavily compressed (JPEG quality about {jpeg_q})")
            score = max(score, 0.5)
        if not problems:
            return StepResult(data=data)
        data["problems"] = problems
        evidence = {**data, "summary": "Low-quality photo: " + "; ".join(problems) + "."}
        return StepResult(flags=[Flag("low_quality", round(min(score, 1.0), 3), evidence)], data=data)
