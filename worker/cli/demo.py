"""`catalog demo`: real photos that ship inside installed packages, through the pipeline.

Two listings: an honest seller's photos, then a second seller who re-uses one of them
(mirrored, resized, re-compressed) and writes a phone number and an e-mail address on another,
so the duplicate-photo and contact-details checks have something real to find.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from worker.config import Settings, redact_url

FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT), size) if FONT.exists() else ImageFont.load_default(size=size)


def demo_photos(out: Path) -> tuple[list[Path], list[Path]]:
    """Write scikit-image's sample photos (shipped in its wheel, no download) to ``out``:
    the honest seller's set and the second seller's set."""
    from skimage import data

    out.mkdir(parents=True, exist_ok=True)
    honest = []
    for name in ("coffee", "chelsea", "astronaut", "rocket"):
        path = out / f"{name}.jpg"
        if not path.exists():
            Image.fromarray(getattr(data, name)()).convert("RGB").save(path, quality=92)
        honest.append(path)
    small = out / "coffee-small.jpg"  # below CATALOG_SR_MIN_SIDE: gets super-resolved
    if not small.exists():
        Image.open(out / "coffee.jpg").resize((200, 133), Image.Resampling.LANCZOS).save(small, quality=90)
    honest.append(small)

    copied = out / "reseller-cat.jpg"  # chelsea, mirrored, resized and re-compressed
    if not copied.exists():
        cat = ImageOps.mirror(Image.open(out / "chelsea.jpg").convert("RGB"))
        cat.resize((360, 240), Image.Resampling.BICUBIC).save(copied, quality=40)
    contact = out / "reseller-contact.jpg"  # astronaut with contact details written on it
    if not contact.exists():
        img = Image.open(out / "astronaut.jpg").convert("RGB")
        draw = ImageDraw.Draw(img)
        for xy, text in (((16, 16), "Call +44 7911 123456"), ((16, 460), "deals.shop@gmail.com")):
            draw.text(xy, text, font=_font(30), fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
        img.save(contact, quality=90)
    return honest, [copied, contact]


def run_demo(settings: Settings, out: Path, as_json: bool, echo: Callable[[str], None]) -> None:
    from worker.cli.common import allow_local
    from worker.pipeline.local import run_in_process
    from worker.reports.listing import listing_report, render_report

    honest, reseller = demo_photos(out)
    settings = allow_local(settings, [str(out.resolve())])  # the demo reads only its own photos
    echo(f"demo: {len(honest) + len(reseller)} photos from scikit-image written to {out.resolve()}")
    echo(f"demo: steps {', '.join(settings.steps)}")
    echo(f"demo: database {redact_url(settings.effective_database_url)}\n")
    reports = []
    for listing_id, seller, photos, category, title in (
        ("demo-listing", "demo-seller", honest, "kitchenware", "Espresso cup, cat and friends"),
        ("demo-reseller", "other-seller", reseller, "pets", "Cat for sale, contact me directly"),
    ):
        run_in_process(settings, [str(p.resolve()) for p in photos], seller=seller, category=category,
                       listing_id=listing_id, title=title)
        reports.append(listing_report(settings, listing_id))
    if as_json:
        echo(json.dumps(reports, indent=2, default=str))
    else:
        echo("\n\n".join(render_report(r) for r in reports))
        echo("\nReview the flags with `catalog flags list` / `catalog flags claim --reviewer you`.")
