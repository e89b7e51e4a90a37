"""The contact sheet of a visual search (`catalog similar ... --sheet out.png`)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from db import models as m
from db.session import transaction
from worker.config import Settings
from worker.search.sheet import Tile, render_sheet, save_sheet, stored_picture


def test_the_sheet_shows_the_query_outlined_then_each_result(tmp_path: Path) -> None:
    red, blue = Image.new("RGB", (400, 300), (220, 20, 20)), Image.new("RGB", (120, 240), (20, 20, 220))
    sheet = render_sheet(Tile(red, ["query", "listing L-1"]),
                         [Tile(blue, ["1. score 0.912", "L-2"]), Tile(None, ["2. score 0.5", "L-3"])],
                         title="catalog similar L-1", side=100, columns=3)
    assert sheet.size == (12 + 3 * 112, 30 + 12 + 112 + 4 * 17)
    pixels = sheet.load()
    assert pixels is not None
    # query picture centred in its square, outlined in the accent colour; the result beside it
    assert pixels[12 + 50, 42 + 50] == (220, 20, 20)
    assert pixels[12 - 2, 42 + 50] == (200, 60, 40)
    assert pixels[12 + 112 + 50, 42 + 50] == (20, 20, 220)
    assert pixels[12 + 224 + 50, 42 + 20] == (235, 235, 235)  # nothing stored: grey square
    out = save_sheet(sheet, tmp_path / "docs" / "sheet.png")
    assert out.stat().st_size < 60_000 and Image.open(out).size == sheet.size
    assert not list(out.parent.glob("*.partial"))


def test_stored_pictures_are_the_thumbnail_else_the_local_original_never_a_remote_url(
        tmp_path: Path, sqlite_template: Path, make_settings: Callable[..., Settings]) -> None:
    db = tmp_path / "catalog.db"
    shutil.copy(sqlite_template, db)
    url = f"sqlite:///{db}"
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (64, 64), (0, 200, 0)).save(photos / "local.png")
    settings = make_settings(database_url=url, fetch_allow_dirs=[str(photos)])
    thumb = settings.effective_artifact_dir / "0000" / "1-thumb.jpg"
    thumb.parent.mkdir(parents=True)
    Image.new("RGB", (32, 32), (0, 0, 250)).save(thumb, quality=95)
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (8, 8)).save(outside)
    with transaction(url) as session:
        listing = m.Listing(external_id="L", seller_id="s", title="", status="done")
        session.add(listing)
        session.flush()
        images = [m.Image(listing_id=listing.id, url=u, status="done") for u in (
            "https://shop.example/a.jpg", str(photos / "local.png"), "https://shop.example/b.jpg", str(outside))]
        session.add_all(images)
        session.flush()
        session.add(m.ArtifactRecord(image_id=images[0].id, kind="thumbnail", path=str(thumb), model_version="t"))
        ids = [i.id for i in images]
    with transaction(url) as session:
        first = stored_picture(session, settings, ids[0])
        assert first is not None and first.size == (32, 32)
        blue = first.getpixel((16, 16))
        assert isinstance(blue, tuple) and blue[2] > 200
        second = stored_picture(session, settings, ids[1])
        assert second is not None and second.getpixel((5, 5)) == (0, 200, 0)
        assert stored_picture(session, settings, ids[2]) is None  # remote, no thumbnail: never fetched
        assert stored_picture(session, settings, ids[3]) is None  # outside CATALOG_FETCH_ALLOW_DIRS
        assert stored_picture(session, settings, 987654) is None
