"""ImageContext.shared / reduced: derived views of the photo made once per image."""

from __future__ import annotations

import numpy as np
from PIL import Image

from worker.config import Settings
from worker.pipeline.contract import ImageContext


def _ctx(image: Image.Image) -> ImageContext:
    return ImageContext(image_id=1, listing_id=1, seller_id="s", category=None, url="u", image=image,
                        raw=b"", source_format="JPEG", sha256="0" * 64, settings=Settings())


def _photo(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR)


def test_shared_computes_once_per_key() -> None:
    ctx = _ctx(_photo(64, 48))
    calls: list[str] = []

    def make(label: str) -> Image.Image:
        calls.append(label)
        return ctx.image.convert("L")

    first = ctx.shared("grey", lambda: make("grey"))
    second = ctx.shared("grey", lambda: make("again"))
    assert first is second and calls == ["grey"]
    other = ctx.shared("other", lambda: make("other"))
    assert other is not first and calls == ["grey", "other"]


def test_reduced_keeps_small_photos_and_aspect() -> None:
    small = _photo(300, 200)
    ctx = _ctx(small)
    same, scale = ctx.reduced(640)
    assert same is small and scale == (1.0, 1.0)
    big = _ctx(_photo(1200, 800))
    copy, (sx, sy) = big.reduced(600)
    assert copy.size == (600, 400) and copy.mode == "RGB"
    assert abs(sx - 0.5) < 1e-9 and abs(sy - 0.5) < 1e-9
    again, _ = big.reduced(600)
    assert again is copy


def test_reduced_chains_from_larger_copy_close_to_direct() -> None:
    photo = _photo(1600, 1200)
    ctx = _ctx(photo)
    ctx.reduced(800)
    chained, _ = ctx.reduced(320)
    direct = photo.resize(chained.size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    diff = np.abs(np.asarray(chained, dtype=np.int16) - np.asarray(direct, dtype=np.int16))
    assert chained.size == (320, 240)
    assert float(diff.mean()) < 2.0 and int(diff.max()) < 40
