"""Contact sheet of a visual search: the query photo, then its results with scores, as one PNG
(``catalog similar ... --sheet out.png``).

:func:`render_sheet` is pure (pictures and captions in, a Pillow image out).
:func:`stored_picture` finds what to show of a stored photo the way the review pages do: the
thumbnail the metadata step stored, else the original when it is a local file the worker may
read (``CATALOG_FETCH_ALLOW_DIRS``); a remote photo is never fetched for a sheet.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps
from sqlalchemy import select
from sqlalchemy.orm import Session

from db import models as m
from worker.config import Settings
from worker.io.decode import decode_image
from worker.io.errors import ImageLoadError
from worker.io.local import file_url_path, read_local_file

FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
BOLD = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
THUMBNAIL_KIND = "thumbnail"  # artifacts.kind of the metadata step's thumbnail
BACKGROUND, INK, MUTED, ACCENT = (255, 255, 255), (20, 20, 20), (95, 95, 95), (200, 60, 40)


@dataclass
class Tile:
    picture: Image.Image | None  # None: nothing to show (the caption says so)
    caption: Sequence[str]  # first line bold


def _font(size: int, bold: bool = False) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    path = BOLD if bold else FONT
    return ImageFont.truetype(str(path), size) if path.exists() else ImageFont.load_default(size=size)


def _fit(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int,
         draw: ImageDraw.ImageDraw) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def render_sheet(query: Tile, results: Sequence[Tile], *, title: str = "", side: int = 200,
                 columns: int = 5) -> Image.Image:
    """The query tile (outlined) first, then the results, ``columns`` per row; each picture fits
    a ``side`` x ``side`` square, captions below it."""
    pad, lines, line_h = 12, 4, 17
    head = 30 if title else 0
    tiles = [query, *results]
    rows = (len(tiles) + columns - 1) // columns
    cell_w, cell_h = side + pad, side + pad + lines * line_h
    sheet = Image.new("RGB", (pad + columns * cell_w, head + pad + rows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    regular, bold = _font(13), _font(13, bold=True)
    if title:
        draw.text((pad, 8), _fit(title, _font(15, bold=True), sheet.width - 2 * pad, draw), font=_font(15, True),
                  fill=INK)
    for index, tile in enumerate(tiles):
        x = pad + (index % columns) * cell_w
        y = head + pad + (index // columns) * cell_h
        if tile.picture is not None:
            thumb = ImageOps.contain(tile.picture.convert("RGB"), (side, side), Image.Resampling.LANCZOS)
            sheet.paste(thumb, (x + (side - thumb.width) // 2, y + (side - thumb.height) // 2))
        else:
            draw.rectangle((x, y, x + side - 1, y + side - 1), fill=(235, 235, 235))
            draw.text((x + 10, y + side // 2 - 8), "no picture stored", font=regular, fill=MUTED)
        if index == 0:
            draw.rectangle((x - 3, y - 3, x + side + 2, y + side + 2), outline=ACCENT, width=3)
        for n, text in enumerate(list(tile.caption)[:lines]):
            draw.text((x, y + side + 4 + n * line_h), _fit(text, bold if n == 0 else regular, side, draw),
                      font=bold if n == 0 else regular, fill=INK if n == 0 else MUTED)
    return sheet


def save_sheet(sheet: Image.Image, path: Path) -> Path:
    """Written atomically as an optimised PNG (a 256-colour palette keeps docs images small)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    sheet.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        partial, format="PNG", optimize=True)
    os.replace(partial, path)
    return path


def stored_picture(session: Session, settings: Settings, image_id: int) -> Image.Image | None:
    """The stored thumbnail of an image, else its local original; None when neither can be read."""
    thumb = session.execute(select(m.ArtifactRecord.path).where(
        m.ArtifactRecord.image_id == image_id, m.ArtifactRecord.kind == THUMBNAIL_KIND,
    ).order_by(m.ArtifactRecord.id.desc()).limit(1)).scalar()
    root = os.path.realpath(settings.effective_artifact_dir)
    if thumb:
        real = os.path.realpath(thumb if os.path.isabs(thumb) else os.path.join(root, thumb))
        if real.startswith(root.rstrip("/") + "/") and os.path.isfile(real):
            try:
                with open(real, "rb") as fh:
                    return decode_image(fh.read(settings.fetch_max_bytes), settings)[0]
            except (OSError, ImageLoadError):
                pass
    url = session.execute(select(m.Image.url).where(m.Image.id == image_id)).scalar()
    if not url or ("://" in url and not url.startswith("file:")):
        return None  # remote: never fetched for a sheet
    try:
        path = file_url_path(url) if url.startswith("file:") else url
        return decode_image(read_local_file(path, url, settings), settings)[0]
    except ImageLoadError:
        return None
