"""`catalog similar` and `catalog search` on a small demo-like catalogue analysed by the real
pipeline (embedded SQLite): a listing whose photo is a crop of the query's ranks first."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image, ImageEnhance, ImageOps
from sqlalchemy import func, select

from db import models as m
from db.session import dispose_engines, transaction
from worker.cli.main import main
from worker.config import load_settings
from worker.search.embedded import EmbeddedIndex

ENV = {"CATALOG_STEPS": "metadata,tagging,embedding", "CATALOG_TORCH_THREADS": "1"}


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> Iterator[dict[str, Any]]:
    """Five sellers: the coffee photo, a cropped and brightened copy of it, and three other
    photos; a sixth listing whose only file is not an image."""
    from skimage import data

    from worker.cli.common import allow_local
    from worker.pipeline.local import run_in_process

    root = tmp_path_factory.mktemp("similar")
    (root / "data").mkdir()
    shutil.copy(sqlite_template, root / "data" / "catalog.db")
    photos = root / "photos"
    photos.mkdir()
    coffee = Image.fromarray(data.coffee())
    coffee.save(photos / "coffee.jpg", quality=92)
    variant = ImageEnhance.Brightness(coffee.crop((70, 25, 530, 385))).enhance(1.15).resize((400, 313))
    variant.save(photos / "coffee-variant.jpg", quality=80)
    for name in ("chelsea", "astronaut", "rocket"):
        Image.fromarray(getattr(data, name)()).convert("RGB").save(photos / f"{name}.jpg", quality=90)
    (photos / "broken.jpg").write_bytes(b"this is no photo")
    query = root / "query.jpg"  # another crop, mirrored: the shopper's own photo of the cup
    ImageOps.mirror(coffee.crop((40, 0, 560, 400))).save(query, quality=85)
    (root / "notes.txt").write_text("not a photo")
    mp = pytest.MonkeyPatch()
    env = {**ENV, "CATALOG_DATA_DIR": str(root / "data")}
    for key, value in env.items():
        mp.setenv(key, value)
    try:
        settings = allow_local(load_settings(), [str(photos.resolve())])
        listings = {}
        for listing, seller, photo, category in (
                ("cups-a", "a", "coffee.jpg", "kitchenware"), ("cups-b", "b", "coffee-variant.jpg", "kitchenware"),
                ("cat-c", "c", "chelsea.jpg", "pets"), ("astro-d", "d", "astronaut.jpg", None),
                ("rocket-e", "e", "rocket.jpg", None), ("broken-f", "f", "broken.jpg", None)):
            run_in_process(settings, [str((photos / photo).resolve())], seller=seller, category=category,
                           listing_id=listing, progress=False)
            listings[listing] = seller
        with transaction(settings.effective_database_url) as session:
            images = dict(session.execute(select(m.Listing.external_id, m.Image.id).join(m.Image)).all())
        yield {"env": env, "root": root, "query": query, "images": images, "url": settings.effective_database_url}
    finally:
        mp.undo()
        EmbeddedIndex.forget_instances()
        dispose_engines()


def run(catalogue: dict[str, Any], *args: str) -> Any:
    return CliRunner().invoke(main, list(args), env=catalogue["env"])


def counts(url: str) -> dict[str, int]:
    tables = (m.Listing, m.Image, m.Tag, m.SearchVector, m.Embedding, m.StepRunRecord, m.ArtifactRecord)
    with transaction(url) as session:
        return {t.__tablename__: session.execute(select(func.count()).select_from(t)).scalar_one() for t in tables}


def test_a_crop_of_the_query_photo_ranks_first(catalogue: dict[str, Any]) -> None:
    result = run(catalogue, "similar", "cups-a")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("similar to listing cups-a (image ") and "seller a left out" in lines[0]
    assert lines[1].startswith(" 1. cups-b  score ")
    listed = json.loads(run(catalogue, "similar", "cups-a", "--json").output)
    ranked = [r["external_id"] for r in listed["results"]]
    assert ranked[0] == "cups-b" and "cups-a" not in ranked and "broken-f" not in ranked
    assert listed["results"][0]["score"] > listed["results"][1]["score"] + 0.1
    assert "espresso" in listed["results"][0]["why"] or "kitchenware" in listed["results"][0]["why"]
    # From the other side, by image id, with the own seller allowed back in (none here).
    by_image = json.loads(run(catalogue, "similar", str(catalogue["images"]["cups-b"]), "--json",
                              "--include-own-seller", "--k", "2").output)
    assert by_image["query"]["image_id"] == catalogue["images"]["cups-b"]
    assert [r["external_id"] for r in by_image["results"]][0] == "cups-a"


def test_filters_apply(catalogue: dict[str, Any]) -> None:
    only = json.loads(run(catalogue, "similar", "cups-a", "--json", "--seller", "c", "--seller", "d").output)
    assert {r["external_id"] for r in only["results"]} == {"cat-c", "astro-d"}
    without = json.loads(run(catalogue, "similar", "cups-a", "--json", "--exclude-seller", "b").output)
    assert "cups-b" not in {r["external_id"] for r in without["results"]}
    category = json.loads(run(catalogue, "similar", "cat-c", "--json", "--category", "kitchenware").output)
    assert [r["external_id"] for r in category["results"]] == ["cups-a", "cups-b"] or \
        [r["external_id"] for r in category["results"]] == ["cups-b", "cups-a"]


def test_a_photo_file_is_embedded_without_storing_anything_and_a_sheet_is_written(
        catalogue: dict[str, Any], tmp_path: Path) -> None:
    before = counts(catalogue["url"])
    sheet = tmp_path / "sheet.png"
    result = run(catalogue, "similar", str(catalogue["query"]), "--k", "3", "--sheet", str(sheet))
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"similar to photo {catalogue['query']}")
    first = result.output.splitlines()[1]
    assert first.startswith((" 1. cups-a ", " 1. cups-b "))
    assert f"contact sheet: {sheet}" in result.output
    with Image.open(sheet) as png:
        assert png.format == "PNG" and png.width > 400
    assert counts(catalogue["url"]) == before


@pytest.mark.parametrize(("args", "code", "words"), [
    (["similar", "no-such-listing"], 1, "There is no listing no-such-listing"),
    (["similar", "broken-f"], 1, "failed analysis"),
    (["similar", "987654"], 1, "There is no image 987654"),
    (["similar", "cups-a", "--k", "0"], 2, "0 is not in the range 1<=x<=100"),
    (["similar", "cups-a", "--k", "101"], 2, "101 is not in the range"),
    (["similar", "/nowhere/photo.jpg"], 2, "neither a listing, an image id nor an existing file"),
    (["similar", "NOTES"], 1, "not an image"),
    (["search", "cup", "--k", "0"], 2, "0 is not in the range"),
    (["search", "?!"], 1, "the query has no words"),
])
def test_bad_input_is_one_sentence_and_changes_nothing(catalogue: dict[str, Any], args: list[str], code: int,
                                                       words: str) -> None:
    args = [str(catalogue["root"] / "notes.txt") if a == "NOTES" else a for a in args]
    before = counts(catalogue["url"])
    result = run(catalogue, *args)
    assert result.exit_code == code, result.output
    assert words in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert counts(catalogue["url"]) == before


def test_tag_search_in_both_languages(catalogue: dict[str, Any]) -> None:
    english = json.loads(run(catalogue, "search", "espresso kitchenware", "--json").output)
    chinese = json.loads(run(catalogue, "search", "厨具", "--json").output)
    assert {h["listing"] for h in english["hits"][:2]} == {"cups-a", "cups-b"}
    assert english["hits"][0]["matched"] == 2
    assert {h["listing"] for h in chinese["hits"]} == {"cups-a", "cups-b"}
    text = run(catalogue, "search", "厨具")
    assert text.exit_code == 0 and "厨具 = kitchenware (category-map" in text.output
