"""Remote photos on the review pages (issue 10: "show what the worker stored; store a thumbnail
if needed"): the worker fetches an http photo and its metadata step stores a JPEG thumbnail;
the pages and the API show that thumbnail, and the service itself never requests the URL."""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from PIL import Image
from skimage import data
from sqlalchemy import select

from db import models as m
from db.session import transaction
from tests.support.api import User
from tests.support.http import LocalImageServer
from tests.support.pipeline import analyze_all, apply, event
from worker.api.app import create_app
from worker.config import Settings


def _src(page: str, testid: str) -> str:
    """The img src inside the figure marked ``data-testid=testid``."""
    figure = page.split(f'data-testid="{testid}"')[1]
    return figure.split('<img src="')[1].split('"')[0]


def _jpeg_size(answer: Any) -> tuple[int, int]:
    """The size of the JPEG a test client's answer carries (after checking it is one)."""
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/jpeg"
    assert answer.headers["x-content-type-options"] == "nosniff"
    with Image.open(io.BytesIO(answer.content)) as img:
        assert img.format == "JPEG"
        return img.size


def test_a_duplicate_of_remote_photos_is_shown_from_the_thumbnails(
        pg_url: str, make_settings: Callable[..., Settings], reviewer: User, log_in, tmp_path: Path) -> None:
    remote = tmp_path / "shop-cdn"
    remote.mkdir()
    cat = Image.fromarray(data.chelsea()).resize((1200, 798))
    cat.save(remote / "cat.jpg", quality=92)
    cat.crop((0, 0, 1180, 798)).save(remote / "cat-copy.jpg", quality=80)
    tag = uuid.uuid4().hex[:8]
    with LocalImageServer(remote) as server:
        # The worker and the service with the same settings: the service could reach the host.
        settings = make_settings(database_url=pg_url, steps=["metadata", "duplicates"],
                                 fetch_allow_hosts=[server.allow_entry])
        for listing, seller, path in ((f"A-{tag}", f"honest-{tag}", "/cat.jpg"),
                                      (f"B-{tag}", f"copycat-{tag}", "/cat-copy.jpg")):
            outcome = apply(pg_url, event(listing, [server.url(path)], seller=seller))
            assert [o.status for o in analyze_all(pg_url, settings, outcome.images_to_analyze)] == ["done"]
        fetched = (server.hits("/cat.jpg"), server.hits("/cat-copy.jpg"))
        assert fetched == (1, 1)
        with transaction(pg_url) as session:
            flag = session.execute(select(m.Flag).join(m.Listing, m.Listing.id == m.Flag.listing_id).where(
                m.Listing.external_id == f"B-{tag}", m.Flag.kind == "duplicate_image")).scalar_one()
            flag_id, this_id, matched_id = flag.id, flag.image_id, flag.evidence["matched_image_id"]

        with TestClient(create_app(settings, secret=b"test-secret-" * 3)) as client:
            log_in(client, reviewer.name)
            page = client.get(f"/review/flags/{flag_id}")
            assert page.status_code == 200
            # Both photos side by side, each from its stored thumbnail.
            assert _src(page.text, "this-photo") == f"/api/v1/images/{this_id}/thumbnail"
            assert _src(page.text, "matched-photo") == f"/api/v1/images/{matched_id}/thumbnail"
            assert 'data-testid="no-photo"' not in page.text
            assert _jpeg_size(client.get(f"/api/v1/images/{this_id}/thumbnail")) == (640, 433)
            assert _jpeg_size(client.get(f"/api/v1/images/{matched_id}/thumbnail",
                                         headers=reviewer.headers)) == (640, 426)
            # Boxes keep the stored photo's frame (the thumbnail has its aspect ratio).
            assert 'data-w="1180" data-h="798"' in page.text
            # The listing page and the JSON API name the same picture.
            listing_page = client.get(f"/review/listings/B-{tag}")
            assert _src(listing_page.text, "listing-photo") == f"/api/v1/images/{this_id}/thumbnail"
            detail = client.get(f"/api/v1/listings/B-{tag}", headers=reviewer.headers).json()
            assert detail["images"][0]["thumbnail"] == f"/api/v1/images/{this_id}/thumbnail"
            assert {a["kind"] for a in detail["images"][0]["artifacts"]} == {"thumbnail"}
            # The remote original itself is not served ...
            assert client.get(f"/api/v1/images/{this_id}/photo").status_code == 404
        # ... and nothing the service did reached the photo's host.
        assert (server.hits("/cat.jpg"), server.hits("/cat-copy.jpg")) == fetched


def _image(pg_url: str, url: str, thumbnail: str | None = None) -> tuple[str, int]:
    external = f"ext-{uuid.uuid4().hex[:10]}"
    with transaction(pg_url) as session:
        listing = m.Listing(external_id=external, seller_id="s", title="", status="done")
        session.add(listing)
        session.flush()
        img = m.Image(listing_id=listing.id, url=url, status="done", width=40, height=30)
        session.add(img)
        session.flush()
        if thumbnail is not None:
            session.add(m.ArtifactRecord(image_id=img.id, kind="thumbnail", path=thumbnail,
                                         model_version="metadata@2"))
        return external, img.id


def test_thumbnail_route_follows_the_artifact_rules(client: TestClient, pg_url: str, reviewer: User,
                                                    api_settings: Settings, tmp_path: Path) -> None:
    inside = api_settings.effective_artifact_dir / "0000" / "t.jpg"
    inside.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (1, 2, 3)).save(inside, "JPEG")
    _, ok = _image(pg_url, "https://img.example/a.jpg", str(inside))
    assert _jpeg_size(client.get(f"/api/v1/images/{ok}/thumbnail", headers=reviewer.headers)) == (40, 30)
    outside = tmp_path / "elsewhere.jpg"
    Image.new("RGB", (40, 30)).save(outside, "JPEG")
    for path in (str(outside), "/etc/passwd", "../elsewhere.jpg"):
        _, bad = _image(pg_url, "https://img.example/b.jpg", path)
        assert client.get(f"/api/v1/images/{bad}/thumbnail", headers=reviewer.headers).status_code == 404, path
    _, none = _image(pg_url, "https://img.example/c.jpg")
    for raw in (str(none), "..%2F1", "1%00", "-1"):
        assert client.get(f"/api/v1/images/{raw}/thumbnail", headers=reviewer.headers).status_code == 404, raw
    assert client.get(f"/api/v1/images/{ok}/thumbnail").status_code == 401


def test_without_a_thumbnail_a_local_photo_is_shown_and_a_remote_one_is_named(
        client: TestClient, pg_url: str, reviewer: User, photo_dir: Path, log_in) -> None:
    """Photos analysed before thumbnails were stored: the local original as before; a remote
    one cannot be shown (it is not fetched), the page says so and gives its address."""
    local = photo_dir / "p.png"
    Image.new("RGB", (40, 30), (9, 9, 9)).save(local)
    local_listing, local_id = _image(pg_url, str(local))
    remote_listing, remote_id = _image(pg_url, "https://img.example/old.jpg")
    with transaction(pg_url) as session:
        session.add(m.Detection(image_id=remote_id, label="shoe", score=0.8, x0=1.2, y0=2, x1=30, y1=25.6,
                                model_version="det@1"))
    log_in(client, reviewer.name)
    page = client.get(f"/review/listings/{local_listing}").text
    assert _src(page, "listing-photo") == f"/api/v1/images/{local_id}/photo"
    assert "full size" not in page  # the original is what is shown already
    page = client.get(f"/review/listings/{remote_listing}").text
    assert 'data-testid="no-photo"' in page and "https://img.example/old.jpg" in page
    assert "<img src=" not in page.split('data-testid="listing-photo"')[1].split("</figure>")[0]
    assert "shoe at 1, 2, 30, 26" in page  # nothing to draw the boxes on: they are listed


def test_a_local_photo_with_a_thumbnail_links_its_full_size(client: TestClient, pg_url: str, reviewer: User,
                                                            api_settings: Settings, photo_dir: Path,
                                                            log_in) -> None:
    local = photo_dir / "big.png"
    Image.new("RGB", (40, 30), (9, 9, 9)).save(local)
    thumb = api_settings.effective_artifact_dir / "0000" / "big-thumb.jpg"
    thumb.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (9, 9, 9)).save(thumb, "JPEG")
    external, image_id = _image(pg_url, local.as_uri(), str(thumb))
    log_in(client, reviewer.name)
    page = client.get(f"/review/listings/{external}").text
    assert _src(page, "listing-photo") == f"/api/v1/images/{image_id}/thumbnail"
    assert f'<a href="/api/v1/images/{image_id}/photo">full size</a>' in page
