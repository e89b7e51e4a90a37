"""Labelled near-duplicate set from photos that ship inside installed packages.

Originals are the real photos of scikit-image's ``data`` module and Debian's darknet sample
pictures; photos at least 500 px on both sides are cut into four non-overlapping tiles, which
gives enough distinct originals (and hard distractors: tiles of one texture look alike).
"""

from __future__ import annotations

import io
import random
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

SKIMAGE_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "clock", "brick",
    "grass", "gravel", "immunohistochemistry", "hubble_deep_field", "retina", "text", "page",
)
DARKNET_DIR = Path("/usr/share/darknet/data")
FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
)


def _photos() -> list[tuple[str, Image.Image]]:
    import skimage.data as data

    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in SKIMAGE_PHOTOS:
            try:
                arr = getattr(data, name)()
            except Exception:  # noqa: BLE001 - a photo needing a download fails with whatever the downloader raises
                continue
            out.append((name, Image.fromarray(np.asarray(arr)).convert("RGB")))
    for path in sorted(DARKNET_DIR.glob("*.jpg")):
        out.append((path.stem, Image.open(path).convert("RGB")))
    return out


def load_pool() -> list[tuple[str, Image.Image]]:
    pool = []
    for name, img in _photos():
        w, h = img.size
        if min(w, h) >= 500:
            for i, (x, y) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
                pool.append((f"{name}#{i}", img.crop((x * w // 2, y * h // 2, (x + 1) * w // 2, (y + 1) * h // 2))))
        else:
            pool.append((name, img))
    return pool


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for path in FONT_CANDIDATES:
        if Path(path).exists():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size)


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _crop(img: Image.Image, fx0: float, fy0: float, fx1: float, fy1: float) -> Image.Image:
    w, h = img.size
    return img.crop((round(w * fx0), round(h * fy0), round(w * fx1), round(h * fy1)))


def _watermark(img: Image.Image) -> Image.Image:
    w, h = img.size
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    f = font(max(12, w // 9))
    draw.text((w * 0.08, h * 0.42), "BEST DEALS 24/7", font=f, fill=(255, 255, 255, 150),
              stroke_width=2, stroke_fill=(0, 0, 0, 150))
    return Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")


def _logo(img: Image.Image) -> Image.Image:
    w, h = img.size
    side = max(16, min(w, h) // 5)
    badge = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    d = ImageDraw.Draw(badge)
    d.ellipse((0, 0, side - 1, side - 1), fill=(220, 30, 30, 230))
    d.text((side * 0.2, side * 0.3), "SHOP", font=font(max(8, side // 4)), fill=(255, 255, 255, 255))
    out = img.convert("RGBA")
    out.alpha_composite(badge, (w - side - w // 30, h - side - h // 30))
    return out.convert("RGB")


def _border(img: Image.Image, colour: tuple[int, int, int], frac: float) -> Image.Image:
    w, h = img.size
    return ImageOps.expand(img, border=(round(w * frac), round(h * frac)), fill=colour)


def _random_crop(img: Image.Image, r: random.Random, limit: float) -> Image.Image:
    """Up to ``limit`` of each dimension removed, split at random between the two sides."""
    cut_x, cut_y = r.uniform(0, limit), r.uniform(0, limit)
    left, top = r.uniform(0, cut_x), r.uniform(0, cut_y)
    return _crop(img, left, top, 1 - (cut_x - left), 1 - (cut_y - top))


Transform = Callable[[Image.Image, random.Random], Image.Image]

TRANSFORMS: dict[str, Transform] = {
    "resize_50": lambda im, r: im.resize((im.width // 2, im.height // 2), Image.Resampling.BILINEAR),
    "resize_150": lambda im, r: im.resize((im.width * 3 // 2, im.height * 3 // 2), Image.Resampling.BICUBIC),
    "jpeg_q30": lambda im, r: _jpeg(im, 30),
    "crop_15_centre": lambda im, r: _crop(im, 0.075, 0.075, 0.925, 0.925),
    "crop_15_corner": lambda im, r: (lambda x, y: _crop(im, x, y, x + 0.85, y + 0.85))(
        r.choice((0.0, 0.15)), r.choice((0.0, 0.15))),
    "crop_15_one_side": lambda im, r: r.choice((
        lambda: _crop(im, 0.15, 0, 1, 1), lambda: _crop(im, 0, 0, 0.85, 1),
        lambda: _crop(im, 0, 0.15, 1, 1), lambda: _crop(im, 0, 0, 1, 0.85)))(),
    "crop_4_one_side": lambda im, r: _crop(im, 0.04, 0, 1, 1),
    "crop_8_one_side": lambda im, r: _crop(im, 0, 0, 1, 0.92),
    "crop_10_corner": lambda im, r: _crop(im, 0, 0.1, 0.9, 1),
    "crop_random_15": lambda im, r: _random_crop(im, r, 0.15),
    "mirror": lambda im, r: ImageOps.mirror(im),
    "brightness_contrast": lambda im, r: ImageEnhance.Contrast(
        ImageEnhance.Brightness(im).enhance(r.choice((0.7, 1.3)))).enhance(r.choice((0.7, 1.3))),
    "border_white": lambda im, r: _border(im, (255, 255, 255), 0.1),
    "border_colour": lambda im, r: _border(im, (r.randrange(256), r.randrange(256), r.randrange(256)), 0.06),
    "watermark_text": lambda im, r: _watermark(im),
    "logo": lambda im, r: _logo(im),
    "combo": lambda im, r: _jpeg(ImageOps.mirror(_crop(im, 0.05, 0.05, 0.95, 0.95)).resize(
        (round(im.width * 0.63), round(im.height * 0.63)), Image.Resampling.BILINEAR), 40),
}


def split(pool: list[tuple[str, Image.Image]], seed: int = 5) -> tuple[list, list]:
    """Two thirds originals, one third distractors (never copied)."""
    items = list(pool)
    random.Random(seed).shuffle(items)
    cut = (len(items) * 2) // 3
    return items[:cut], items[cut:]
