"""Search routes of the HTTP service: POST /analyze, GET /search, GET /listings/{id}/similar,
POST /search/image. Every bad input is one sentence and changes nothing in the database."""

from __future__ import annotations

import io
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from db import models as m
from db.session import transaction
from tests.support.api import User
from worker.api import auth
from worker.api.app import create_app
from worker.config import Settings
from worker.search.embedded import EmbeddedIndex
from worker.search.vectors import write_vectors

STEPS = ["metadata", "tagging", "detection", "segmentation", "embedding"]
VERSION = "efficientnet-lite0-imagenet@test"
TABLES = (m.Listing, m.Image, m.Tag, m.Detection, m.SearchVector, m.Flag, m.StepRunRecord, m.ArtifactRecord,
          m.Embedding, m.Label)


@pytest.fixture
def api_settings(pg_url: str, make_settings: Callable[..., Settings], photo_dir: Path) -> Settings:
    return make_settings(database_url=pg_url, fetch_allow_dirs=[str(photo_dir)], steps=STEPS, torch_threads=1,
                         analyze_rate_per_minute=0, search_embedding="full")


@pytest.fixture(autouse=True)
def _forget_index_files() -> Iterator[None]:
    yield
    EmbeddedIndex.forget_instances()


def coffee(crop: tuple[int, int, int, int] | None = None) -> bytes:
    from skimage import data

    img = Image.fromarray(data.coffee())
    if crop:
        img = img.crop(crop)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def counts(url: str) -> dict[str, int]:
    with transaction(url) as session:
        return {t.__tablename__: session.execute(select(func.count()).select_from(t)).scalar_one() for t in TABLES}


def unit(rng: np.random.Generator, near: np.ndarray | None = None, noise: float = 0.1) -> np.ndarray:
    fresh = rng.standard_normal(1280).astype(np.float32)
    vec = fresh / np.linalg.norm(fresh) if near is None else near + noise * fresh / np.linalg.norm(fresh)
    return (vec / np.linalg.norm(vec)).astype(np.float32)


def add_listing(url: str, vec: np.ndarray | None, *, seller: str, image_status: str = "done",
                tags: tuple[tuple[str, str, float], ...] = (), error: str | None = None,
                version: str = VERSION) -> str:
    with transaction(url) as session:
        listing = m.Listing(external_id=f"L-{uuid.uuid4().hex[:10]}", seller_id=seller, title="t", status="done")
        session.add(listing)
        session.flush()
        image = m.Image(listing_id=listing.id, url=f"https://shop.example/{uuid.uuid4().hex}.jpg",
                        status=image_status, error=error)
        session.add(image)
        session.flush()
        for name, source, score in tags:
            session.add(m.Tag(listing_id=listing.id, image_id=image.id, name=name, score=score, source=source,
                              model_version="t"))
        if vec is not None:
            write_vectors(session, image_id=image.id, listing_id=listing.id,
                          found={"full": (vec, version), "region": (vec, version)})
        return listing.external_id


# --- POST /analyze ---------------------------------------------------------------------------


def test_analyze_describes_a_photo_and_stores_nothing(client: TestClient, reviewer: User, pg_url: str) -> None:
    before = counts(pg_url)
    answer = client.post("/api/v1/analyze", headers=reviewer.headers,
                         files={"photo": ("cup.jpg", coffee(), "image/jpeg")})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["category"]["name"] == "kitchenware" and body["category"]["names"]["zh-CN"] == "厨具"
    assert any(b["label"] == "cup" for b in body["boxes"])
    assert body["colours"] and {t["source"] for t in body["tags"]} >= {"imagenet", "detection", "colour"}
    assert [s["status"] for s in body["steps"]] == ["ok"] * 4
    assert counts(pg_url) == before


@pytest.mark.parametrize(("send", "status", "words"), [
    ({"files": {"photo": ("x.jpg", b"hello, this is text", "image/jpeg")}}, 400, "not an image"),
    ({"content": b"%PDF-1.7 not a photo", "headers": {"Content-Type": "image/jpeg"}}, 400, "PDF"),
    ({"files": {"photo": ("x.jpg", coffee()[:4000], "image/jpeg")}}, 400, "truncated"),
    ({"files": {"other": ("x.jpg", coffee(), "image/jpeg")}}, 400, "field 'photo'"),
    ({}, 400, "no photo"),
])
def test_analyze_refuses_what_is_not_a_photo(client: TestClient, reviewer: User, pg_url: str,
                                             send: dict[str, Any], status: int, words: str) -> None:
    before = counts(pg_url)
    headers = {**reviewer.headers, **send.pop("headers", {})}
    answer = client.post("/api/v1/analyze", headers=headers, **send)
    assert answer.status_code == status, answer.text
    detail = answer.json()["detail"]
    assert isinstance(detail, str) and words in detail and "\n" not in detail
    assert counts(pg_url) == before


def test_too_large_uploads_are_413(pg_url: str, make_settings: Callable[..., Settings], reviewer: User) -> None:
    settings = make_settings(database_url=pg_url, steps=STEPS, fetch_max_bytes=20_000, max_pixels=200_000)
    wide = io.BytesIO()
    Image.new("RGB", (1000, 1000), (200, 30, 30)).save(wide, format="PNG")  # 1 Mpx in a few KB
    assert len(wide.getvalue()) < 20_000
    before = counts(pg_url)
    with TestClient(create_app(settings, secret=b"s" * 32)) as c:
        for path in ("/api/v1/analyze", "/api/v1/search/image"):
            # Over the photo limit (the route says so) ...
            big = c.post(path, headers=reviewer.headers, files={"photo": ("c.jpg", coffee(), "image/jpeg")})
            assert big.status_code == 413 and "CATALOG_FETCH_MAX_BYTES" in big.json()["detail"], big.text
            # ... far over it (the body limit stops reading) ...
            huge = c.post(path, headers={**reviewer.headers, "Content-Type": "image/jpeg"}, content=b"\xff" * 200_000)
            assert huge.status_code == 413 and "too large" in huge.json()["detail"]
            # ... and too many pixels in a small file.
            pixels = c.post(path, headers=reviewer.headers, files={"photo": ("w.png", wide.getvalue(), "image/png")})
            assert pixels.status_code == 413 and "CATALOG_MAX_PIXELS" in pixels.json()["detail"], pixels.text
    assert counts(pg_url) == before


def test_each_user_has_a_rate_limit_with_retry_after(pg_url: str, make_settings: Callable[..., Settings],
                                                    make_user: Callable[..., User]) -> None:
    settings = make_settings(database_url=pg_url, steps=["metadata"], analyze_rate_per_minute=2)
    alice, bob = make_user(), make_user()
    text = {"photo": ("x.jpg", b"not a photo", "image/jpeg")}
    with TestClient(create_app(settings, secret=b"s" * 32)) as c:
        assert [c.post("/api/v1/analyze", headers=alice.headers, files=text).status_code
                for _ in range(2)] == [400, 400]
        third = c.post("/api/v1/search/image", headers=alice.headers, files=text)  # the same budget
        assert third.status_code == 429
        assert 1 <= int(third.headers["retry-after"]) <= 60
        assert "CATALOG_ANALYZE_RATE_PER_MINUTE" in third.json()["detail"]
        assert c.post("/api/v1/analyze", headers=bob.headers, files=text).status_code == 400  # bob has his own


# --- GET /search -------------------------------------------------------------------------------


def test_tag_search_in_english_and_chinese(client: TestClient, reviewer: User, pg_url: str) -> None:
    seller = f"s-{uuid.uuid4().hex[:6]}"
    red_cup = add_listing(pg_url, None, seller=seller, tags=(("cup", "detection", 0.8), ("red", "colour", 0.5)))
    cup = add_listing(pg_url, None, seller=seller, tags=(("cup", "detection", 0.9),))
    for q in ("red cup", "红色杯子"):
        answer = client.get("/api/v1/search", params={"q": q, "k": 100}, headers=reviewer.headers)
        assert answer.status_code == 200, answer.text
        mine = [h["listing"] for h in answer.json()["hits"] if h["listing"] in (red_cup, cup)]
        assert mine == [red_cup, cup]
    cases: list[tuple[dict[str, str | int], str]] = [
        ({"q": "cup", "k": 0}, "k must be between 1 and 100"),
        ({"q": "cup", "k": 101}, "k must be between 1 and 100"),
        ({"q": " ?! "}, "no words")]
    for params, words in cases:
        bad = client.get("/api/v1/search", params=params, headers=reviewer.headers)
        assert bad.status_code == 422 and words in bad.json()["detail"]


# --- visual search ----------------------------------------------------------------------------


def test_listing_similar_finds_the_nearest_other_sellers_and_refuses_bad_input(
        client: TestClient, reviewer: User, pg_url: str) -> None:
    rng = np.random.default_rng(11)
    mine, near, far, other = (f"s-{uuid.uuid4().hex[:6]}" for _ in range(4))
    base = unit(rng)
    query = add_listing(pg_url, base, seller=mine, tags=(("cup", "detection", 0.9),))
    own = add_listing(pg_url, unit(rng, base, 0.05), seller=mine)
    close = add_listing(pg_url, unit(rng, base, 0.4), seller=near, tags=(("cup", "detection", 0.7),))
    farther = add_listing(pg_url, unit(rng, base, 1.0), seller=far)
    unrelated = add_listing(pg_url, unit(rng), seller=other)
    failed = add_listing(pg_url, None, seller=mine, image_status="failed", error="not_an_image: broken file")
    before = counts(pg_url)
    sellers = {"seller": [mine, near, far, other]}
    answer = client.get(f"/api/v1/listings/{query}/similar", params={"k": 3, **sellers}, headers=reviewer.headers)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["query"]["listing"] == query and body["query"]["seller_id"] == mine
    assert [r["external_id"] for r in body["results"]] == [close, farther, unrelated]  # own seller left out
    assert body["results"][0]["why"] == ["cup"] and body["results"][0]["score"] > body["results"][1]["score"]
    with_own = client.get(f"/api/v1/listings/{query}/similar",
                          params={"k": 2, "include_own_seller": "true", **sellers}, headers=reviewer.headers)
    assert [r["external_id"] for r in with_own.json()["results"]] == [own, close]
    for path, params, status, words in (
            (f"/api/v1/listings/nope-{uuid.uuid4().hex}/similar", {}, 404, "There is no listing"),
            (f"/api/v1/listings/{failed}/similar", {}, 409, "failed analysis"),
            (f"/api/v1/listings/{query}/similar", {"k": 0}, 422, "k must be a whole number from 1 to 100"),
            (f"/api/v1/listings/{query}/similar", {"k": 101}, 422, "k must be a whole number from 1 to 100"),
            (f"/api/v1/listings/{query}/similar", {"status": "deleted"}, 422, "status must be among"),
    ):
        bad = client.get(path, params=params, headers=reviewer.headers)
        assert bad.status_code == status, (path, params, bad.text)
        assert isinstance(bad.json()["detail"], str) and words in bad.json()["detail"]
    assert counts(pg_url) == before


def test_search_by_photo_finds_the_listing_whose_photo_is_a_crop_of_it(
        client: TestClient, reviewer: User, pg_url: str, api_settings: Settings) -> None:
    from worker.search.analyze import analyze_photo, decode_upload

    rng = np.random.default_rng(5)
    # The catalogue holds a crop of the coffee photo (its real vector) among random ones.
    crop = analyze_photo(decode_upload(coffee((60, 20, 540, 390)), api_settings), api_settings)
    vec, version = crop.vector("full")
    sellers = [f"s-{uuid.uuid4().hex[:6]}" for _ in range(4)]
    target = add_listing(pg_url, vec, seller=sellers[0], version=version)
    for seller in sellers[1:]:
        add_listing(pg_url, unit(rng), seller=seller, version=version)
    before = counts(pg_url)
    answer = client.post("/api/v1/search/image", params={"k": 3, "seller": sellers}, headers=reviewer.headers,
                         files={"photo": ("cup.jpg", coffee(), "image/jpeg")})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["results"][0]["external_id"] == target and body["results"][0]["score"] > 0.8
    assert body["query"]["photo"]["category"]["name"] == "kitchenware"
    bad = client.post("/api/v1/search/image", params={"k": 500}, headers=reviewer.headers,
                      files={"photo": ("cup.jpg", coffee(), "image/jpeg")})
    assert bad.status_code == 422 and "k must be a whole number" in bad.json()["detail"]
    assert counts(pg_url) == before


def test_the_routes_are_in_the_openapi_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/v1/analyze", "/api/v1/search", "/api/v1/search/image",
            "/api/v1/listings/{external_id}/similar"} <= set(paths)
    upload = paths["/api/v1/analyze"]["post"]
    assert "multipart/form-data" in upload["requestBody"]["content"] and "429" in upload["responses"]


def test_similar_on_the_embedded_sqlite_database(tmp_path: Path, sqlite_template: Path,
                                                 make_settings: Callable[..., Settings]) -> None:
    path = tmp_path / "catalog.db"
    shutil.copy(sqlite_template, path)
    url = f"sqlite:///{path}"
    with transaction(url) as session:
        auth.create_user(session, "ann", "reviewer")
        token = auth.issue_token(session, "ann")
    rng = np.random.default_rng(3)
    base = unit(rng)
    query = add_listing(url, base, seller="a")
    near = add_listing(url, unit(rng, base, 0.2), seller="b")
    add_listing(url, unit(rng), seller="c")
    h = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(make_settings(database_url=url, search_embedding="full"))) as c:
        answer = c.get(f"/api/v1/listings/{query}/similar", params={"k": 1}, headers=h)
        assert answer.status_code == 200, answer.text
        assert [r["external_id"] for r in answer.json()["results"]] == [near]
        assert c.get("/api/v1/listings/missing/similar", headers=h).status_code == 404


def test_search_switched_off_is_503_before_any_model_runs(pg_url: str, make_settings: Callable[..., Settings],
                                                          reviewer: User) -> None:
    settings = make_settings(database_url=pg_url, steps=STEPS, search_backend="off", analyze_rate_per_minute=1)
    query = add_listing(pg_url, unit(np.random.default_rng(1)), seller=f"s-{uuid.uuid4().hex[:6]}")
    with TestClient(create_app(settings, secret=b"s" * 32)) as c:
        for _ in range(2):  # refused before the photo counts against the rate
            off = c.post("/api/v1/search/image", headers=reviewer.headers,
                         files={"photo": ("cup.jpg", coffee(), "image/jpeg")})
            assert off.status_code == 503 and "CATALOG_SEARCH_BACKEND=off" in off.json()["detail"]
        listing = c.get(f"/api/v1/listings/{query}/similar", headers=reviewer.headers)
        assert listing.status_code == 503 and "CATALOG_SEARCH_BACKEND=off" in listing.json()["detail"]
