"""`catalog demo` runs every step on real photos and shows what the issues promise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from worker.cli.main import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    data = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    mp.setenv("CATALOG_DATA_DIR", str(data))
    mp.setenv("CATALOG_TORCH_THREADS", "1")
    try:
        result = CliRunner().invoke(main, ["demo", "--json"])
    finally:
        mp.undo()
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("["):])


def image(reports: list[dict], name: str) -> dict:
    return next(i for r in reports for i in r["images"] if i["url"].endswith(name))


def test_every_step_ran(demo: list[dict]) -> None:
    for report in demo:
        assert report["listing"]["status"] == "done"
        for img in report["images"]:
            assert img["status"] == "done"
            assert {s["status"] for s in img["steps"]} == {"ok"}, img["steps"]


def test_coffee_gets_category_label_box_colours_and_cutout(demo: list[dict]) -> None:
    coffee = image(demo, "/coffee.jpg")
    tags = {(t["source"], t["name"]) for t in coffee["tags"]}
    assert ("category-map", "kitchenware") in tags
    assert ("imagenet", "espresso") in tags or ("imagenet", "cup") in tags
    assert any(d["label"] == "cup" for d in coffee["detections"])
    assert any(source == "colour" for source, _ in tags)
    cutout = next(a for a in coffee["artifacts"] if a["kind"] == "cutout")
    assert Path(cutout["path"]).exists()


def test_small_photo_is_super_resolved(demo: list[dict]) -> None:
    small = image(demo, "/coffee-small.jpg")
    sr = next(a for a in small["artifacts"] if a["kind"] == "superres")
    assert min(sr["width"], sr["height"]) >= 512 and Path(sr["path"]).exists()


def test_reseller_gets_duplicate_and_contact_flags_with_evidence(demo: list[dict]) -> None:
    honest, reseller = demo
    assert honest["listing"]["fraud_decision"] == "ok"
    flags = [f for img in reseller["images"] for f in img["flags"]]
    dup = next(f for f in flags if f["kind"] == "duplicate_image")
    assert dup["evidence"]["matched_listing_external_id"] == "demo-listing"
    assert dup["evidence"]["matched_seller_id"] == "demo-seller" and "another seller" in dup["evidence"]["summary"]
    contact = next(f for f in flags if f["kind"] == "contact_info")
    texts = {m["text"] for m in contact["evidence"]["matches"]}
    assert "+447911123456" in texts and "deals.shop@gmail.com" in texts
    assert reseller["listing"]["fraud_decision"] in ("review", "hold")
    assert not any(f["kind"] == "duplicate_image" for img in honest["images"] for f in img["flags"])


def test_demo_reads_its_own_photos_without_any_allowed_dirs(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """CATALOG_FETCH_ALLOW_DIRS is empty by default; the demo allows its photo folder itself."""
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CATALOG_STEPS", "metadata")
    result = CliRunner().invoke(main, ["demo", "--json"])
    assert result.exit_code == 0, result.output
    reports = json.loads(result.stdout[result.stdout.index("["):])
    statuses = [(i["url"].rsplit("/", 1)[-1], i["status"], i["error"]) for r in reports for i in r["images"]]
    assert len(statuses) == 7 and all(status == "done" for _name, status, _error in statuses), statuses
