"""First analysis step: image metadata, 64-bit perceptual hashes and a bounded thumbnail (no
model needed).

The thumbnail (artifact kind ``thumbnail``) is what the review pages show of a photo: in
production photos are remote URLs, and the review service never fetches a URL on a browser's
behalf, so it shows what the worker stored. It is a JPEG whose longer side is at most
``CATALOG_THUMBNAIL_SIDE`` (never upscaled), made from the decoded image, so the EXIF orientation
is already applied and no metadata of the upload (GPS position, camera) is carried over.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import ClassVar

from PIL import Image

from worker.config import Settings
from worker.io import lanczos
from worker.io.hashing import dhash, hashes, phash, to_hex
from worker.pipeline.contract import Artifact, ImageContext, StepResult

THUMBNAIL_KIND = "thumbnail"
THUMBNAIL_QUALITY = 85
THUMBNAIL_FILTER = Image.Resampling.BICUBIC


def thumbnail_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """``size`` scaled down (aspect ratio kept, each side at least 1) so that its longer side
    is at most ``max_side``; a smaller image keeps its size (a thumbnail is never upscaled)."""
    width, height = size
    longer = max(width, height)
    if longer <= max_side:
        return width, height
    return max(1, round(width * max_side / longer)), max(1, round(height * max_side / longer))


def write_thumbnail(image: Image.Image, max_side: int, path: Path) -> Artifact:
    """A JPEG of ``image`` whose longer side is at most ``max_side`` at ``path``.

    Written to a temporary file first and renamed into place: the review service may be
    serving the previous thumbnail of the same image while the image is analysed again."""
    # Bicubic: for a picture people look at, about half a grey level from Lanczos on average
    # (tests/worker/steps/test_overhead_cuts.py).
    size = thumbnail_size(image.size, max_side)
    if size == image.size:
        thumb = image if image.mode == "RGB" else image.convert("RGB")
    elif "torch" in sys.modules:
        # A model step has loaded torch: Pillow's antialiased bicubic computed by torch's uint8
        # kernels, ~3x cheaper (the rounding differs on a fraction of the pixels, < 0.05 grey
        # levels on average). A worker without model steps never imports torch (~0.7 GB of
        # RSS) for this: it keeps Pillow's own resize.
        from worker.models.common import resample_uint8, tensor_image

        thumb = tensor_image(resample_uint8(image, size, "bicubic"))
    else:
        thumb = image.resize(size, THUMBNAIL_FILTER, reducing_gap=2.0)
        if thumb.mode != "RGB":  # steps see RGB; a caller's RGBA or L image still makes a JPEG
            thumb = thumb.convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            # No optimize=True: its second Huffman pass cost more than the JPEG encode itself
            # (1.1 of 1.7 ms) for a file ~1 % smaller.
            thumb.save(fh, format="JPEG", quality=THUMBNAIL_QUALITY)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return Artifact(THUMBNAIL_KIND, path, thumb.width, thumb.height)


def photo_hashes(grey: Image.Image) -> tuple[int, int]:
    """``hashes(grey)`` (pHash, dHash), bit for bit, ~2.5x cheaper: the two Lanczos reductions
    of the full photo that start them are computed as matrix products
    (:mod:`worker.io.lanczos`, the same pixels as Pillow's), and the hashes are taken of those
    32 x 32 and 9 x 8 images (which Pillow's resize to their own size only copies)."""
    if not lanczos.AVAILABLE or grey.mode != "L":
        return hashes(grey)
    small, tiny = lanczos.lanczos_grey(grey, [(32, 32), (9, 8)])
    return phash(Image.fromarray(small, "L")), dhash(Image.fromarray(tiny, "L"))


class MetadataStep:
    name: ClassVar[str] = "metadata"
    requires: ClassVar[tuple[str, ...]] = ()
    # @2: also stores the thumbnail artifact.
    VERSION: ClassVar[str] = "metadata@2"

    def version(self, settings: Settings) -> str:
        """A rules-only step: the version changes when its rules do.

        ``CATALOG_THUMBNAIL_SIDE`` is not part of it: a new size applies to photos analysed from
        then on, without analysing every stored photo again (each artifact row records its size)."""
        return self.VERSION

    def run(self, ctx: ImageContext) -> StepResult:
        width, height = ctx.image.size
        # the full-size grey copy every step shares (duplicates hashes it too): one conversion
        phash, dhash = photo_hashes(ctx.shared("grey", lambda: ctx.image.convert("L")))
        thumbnail = write_thumbnail(ctx.image, ctx.settings.thumbnail_side,
                                    ctx.artifact_dir / f"{ctx.image_id}-thumb.jpg")
        return StepResult(
            artifacts=[thumbnail],
            data={
                "width": width,
                "height": height,
                "format": ctx.source_format,
                "size_bytes": len(ctx.raw),
                "sha256": ctx.sha256,
                "phash": to_hex(phash),
                "dhash": to_hex(dhash),
            },
        )
