"""Issue 10, acceptance 2: the review page in real headless Chromium (Debian's chromium driven
by Playwright): log in, open the queue, open a duplicate flag, see both photos side by side
(remote photos, shown from the thumbnails the worker stored), confirm with the keyboard, and the
database shows the decision.

Screenshots go to the test's temporary directory, and also to $CATALOG_TEST_SCREENSHOT_DIR when
set (``CATALOG_TEST_SCREENSHOT_DIR=docs/img`` refreshes the README's picture)."""

from __future__ import annotations

import os
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from PIL import Image

from db import models as m
from db.session import transaction
from worker.config import Settings
from worker.steps.metadata import write_thumbnail

CHROMIUM = "/usr/bin/chromium"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (scripts/system-deps)"),
]


def _photos(photo_dir: Path) -> tuple[Path, Path]:
    from skimage import data

    original = Image.fromarray(data.chelsea())
    first = photo_dir / "seller-a-cat.jpg"
    original.save(first, quality=92)
    # The copy: cropped, scaled down and recompressed, as a stolen photo usually is.
    copy = original.crop((20, 10, original.width - 20, original.height - 10)).resize((400, 260))
    second = photo_dir / "seller-b-cat.jpg"
    copy.save(second, quality=70)
    return first, second


def _duplicate(pg_url: str, photo_dir: Path, artifact_dir: Path) -> tuple[int, str]:
    """A duplicate flag between two photos on the shop's CDN (remote URLs, as in production):
    the service never fetches them, the pages show the thumbnails the metadata step stored."""
    first, second = _photos(photo_dir)
    tag = uuid.uuid4().hex[:6]
    then = datetime.now(UTC) - timedelta(days=3)
    with transaction(pg_url) as session:
        orig = m.Listing(external_id=f"A-{tag}", seller_id=f"honest-{tag}", title="Cat poster", status="done",
                         created_at=then)
        thief = m.Listing(external_id=f"B-{tag}", seller_id=f"copycat-{tag}", title="Cat poster!!", status="done")
        session.add_all([orig, thief])
        session.flush()
        img_a = m.Image(listing_id=orig.id, url=f"https://cdn.shop.invalid/{tag}/{first.name}", status="done",
                        width=451, height=300, created_at=then)
        img_b = m.Image(listing_id=thief.id, url=f"https://cdn.shop.invalid/{tag}/{second.name}", status="done",
                        width=400, height=260)
        session.add_all([img_a, img_b])
        session.flush()
        for img, path in ((img_a, first), (img_b, second)):
            with Image.open(path) as photo:
                thumb = write_thumbnail(photo.convert("RGB"), 640, artifact_dir / f"{img.id}-thumb.jpg")
            session.add(m.ArtifactRecord(image_id=img.id, kind=thumb.kind, path=str(thumb.path),
                                         width=thumb.width, height=thumb.height, model_version="metadata@2"))
        flag = m.Flag(listing_id=thief.id, image_id=img_b.id, kind="duplicate_image", score=0.97, evidence={
            "summary": f"The photo is a copy of seller honest-{tag}'s photo in listing A-{tag}.",
            "matched_image_id": img_a.id, "matched_listing_id": orig.id,
            "matched_listing_external_id": orig.external_id,
            "matched_seller_id": orig.seller_id, "matched_first_seen": then.isoformat(),
            "hash_kind": "phash+dhash", "hamming_distance": 9, "phash_distance": 4, "dhash_distance": 5,
            "mirrored": False, "cosine": 0.97,
            "first_upload": {"seller_id": orig.seller_id, "listing_external_id": orig.external_id,
                             "image_id": img_a.id, "first_seen": then.isoformat()}})
        session.add(flag)
        session.flush()
        return flag.id, thief.external_id


def test_reviewer_confirms_a_duplicate_with_the_keyboard(served: str, pg_url: str, photo_dir: Path,
                                                         api_settings: Settings, reviewer, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    flag_id, _ = _duplicate(pg_url, photo_dir, api_settings.effective_artifact_dir)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{served}/review")
            assert page.url.endswith("/review/login")  # not logged in: sent to the login page
            page.fill("input[name=name]", reviewer.name)
            page.fill("input[name=password]", "correct horse battery")
            page.click("button[type=submit]")
            page.wait_for_url(f"{served}/review")
            page.screenshot(path=str(shots / "review_queue.png"), full_page=True)

            page.click(f"a.flag-link[href='/review/flags/{flag_id}']")
            page.wait_for_url(f"{served}/review/flags/{flag_id}")
            this = page.locator("[data-testid=this-photo] img")
            matched = page.locator("[data-testid=matched-photo] img")
            expect(this).to_be_visible()
            expect(matched).to_be_visible()
            # Both photos really loaded (decoded), not broken-image icons: the stored thumbnails.
            for img in (this, matched):
                assert (img.get_attribute("src") or "").endswith("/thumbnail")
                page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=img.element_handle())
            box_a, box_b = this.bounding_box(), matched.bounding_box()
            assert box_a and box_b and box_a["x"] + box_a["width"] <= box_b["x"]  # side by side
            expect(page.locator("[data-testid=first-upload]")).to_contain_text("honest-")
            expect(page.locator("table.evidence")).to_contain_text("9")
            page.screenshot(path=str(shots / "review_flag.png"), full_page=True)

            page.keyboard.press("c")
            page.wait_for_url(f"{served}/review/flags/{flag_id}")
            expect(page.locator("[data-testid=status]")).to_contain_text("confirmed")
            page.screenshot(path=str(shots / "review_flag_confirmed.png"), full_page=True)
        finally:
            browser.close()

    with transaction(pg_url) as session:
        flag = session.get_one(m.Flag, flag_id)
        assert (flag.status, flag.reviewed_by) == ("confirmed", reviewer.name)
        assert flag.reviewed_at is not None
    assert (shots / "review_flag.png").stat().st_size > 10_000
    target = os.environ.get("CATALOG_TEST_SCREENSHOT_DIR")
    if target:
        for shot in shots.iterdir():
            shutil.copy(shot, Path(target) / shot.name)
