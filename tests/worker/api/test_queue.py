"""The flag queue over HTTP: concurrent claims from many clients, decisions recorded with who
and when (flags, reviews, reviewed labels), pagination caps, listings and tag review."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from db import models as m
from db.session import transaction


def _flags(pg_url: str, count: int, kind: str, score: float = 0.9) -> tuple[str, list[int]]:
    with transaction(pg_url) as session:
        listing = m.Listing(external_id=f"ext-{uuid.uuid4().hex[:10]}", seller_id="s", title="", status="done")
        session.add(listing)
        session.flush()
        rows = [m.Flag(listing_id=listing.id, kind=kind, score=score, evidence={"summary": f"n{i}"})
                for i in range(count)]
        session.add_all(rows)
        session.flush()
        return listing.external_id, [f.id for f in rows]


@pytest.mark.slow  # ~4 s: 12 clients against a real server
def test_many_concurrent_clients_never_get_the_same_flag(served: str, pg_url: str, make_user) -> None:
    kind = f"race_{uuid.uuid4().hex[:6]}"
    _, ids = _flags(pg_url, 60, kind)
    users = [make_user("reviewer") for _ in range(12)]
    got: dict[str, list[int]] = {u.name: [] for u in users}
    errors: list[str] = []
    start = threading.Barrier(len(users))

    def work(user) -> None:
        with httpx.Client(base_url=served, headers=user.headers, timeout=30) as c:
            start.wait()
            while True:
                answer = c.post("/api/v1/flags/claim", json={"kind": kind})
                if answer.status_code == 204:
                    return
                if answer.status_code != 200:
                    errors.append(answer.text)
                    return
                got[user.name].append(answer.json()["id"])

    threads = [threading.Thread(target=work, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    claimed = [i for lst in got.values() for i in lst]
    assert not errors
    assert sorted(claimed) == sorted(ids)  # every flag handed out exactly once
    assert sum(1 for lst in got.values() if lst) > 1  # the clients really competed
    with transaction(pg_url) as session:
        holders = dict(session.execute(select(m.Flag.id, m.Flag.claimed_by).where(m.Flag.kind == kind)).all())
    assert all(flag_id in got[str(holders[flag_id])] for flag_id in ids)


@pytest.mark.slow  # ~3 s: 10 clients against a real server
def test_concurrent_claims_of_one_specific_flag_have_one_winner(served: str, pg_url: str, make_user) -> None:
    _, (flag_id,) = _flags(pg_url, 1, f"one_{uuid.uuid4().hex[:6]}")
    users = [make_user("reviewer") for _ in range(10)]
    codes: dict[str, int] = {}
    start = threading.Barrier(len(users))

    def work(user) -> None:
        with httpx.Client(base_url=served, headers=user.headers, timeout=30) as c:
            start.wait()
            codes[user.name] = c.post(f"/api/v1/flags/{flag_id}/claim").status_code

    threads = [threading.Thread(target=work, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [name for name, code in codes.items() if code == 200]
    assert len(winners) == 1 and sorted(codes.values()) == [200] + [409] * 9
    with transaction(pg_url) as session:
        assert session.get_one(m.Flag, flag_id).claimed_by == winners[0]


def test_decision_lands_with_who_and_when(client: TestClient, pg_url: str, reviewer, make_user) -> None:
    external_id, (flag_id,) = _flags(pg_url, 1, f"dec_{uuid.uuid4().hex[:6]}")
    other = make_user("reviewer")
    # Deciding needs a claim, and only the holder decides.
    early = client.post(f"/api/v1/flags/{flag_id}/resolve", json={"verdict": "confirmed"}, headers=reviewer.headers)
    assert early.status_code == 409 and "claim it first" in early.json()["detail"]
    claim = client.post(f"/api/v1/flags/{flag_id}/claim", headers=reviewer.headers)
    assert claim.status_code == 200 and claim.json()["listing_external_id"] == external_id
    assert client.post(f"/api/v1/flags/{flag_id}/claim", headers=other.headers).status_code == 409
    assert client.post(f"/api/v1/flags/{flag_id}/resolve", json={"verdict": "confirmed"},
                       headers=other.headers).status_code == 409
    before = datetime.now(UTC)
    done = client.post(f"/api/v1/flags/{flag_id}/resolve", headers=reviewer.headers,
                       json={"verdict": "dismissed", "note": "same seller, two shops"})
    assert done.status_code == 200 and done.json()["status"] == "dismissed"
    with transaction(pg_url) as session:
        flag = session.get_one(m.Flag, flag_id)
        review = session.execute(select(m.Review).where(m.Review.flag_id == flag_id)).scalar_one()
        labels = session.execute(select(m.Label).where(m.Label.flag_id == flag_id)).scalars().all()
    assert (flag.status, flag.reviewed_by, flag.note) == ("dismissed", reviewer.name, "same seller, two shops")
    assert review.reviewer == reviewer.name and review.verdict == "dismissed"
    assert abs(review.created_at - before) < timedelta(seconds=30)
    assert len(labels) == 1 and labels[0].reviewer == reviewer.name and labels[0].created_at >= before - timedelta(1)
    history = client.get("/api/v1/me/history", headers=reviewer.headers).json()["items"]
    assert history[0]["flag_id"] == flag_id and history[0]["verdict"] == "dismissed"
    assert history[0]["listing_external_id"] == external_id
    assert client.post(f"/api/v1/flags/{flag_id}/release", headers=reviewer.headers).status_code == 409


def test_claim_with_an_unknown_kind_lists_the_valid_ones(client: TestClient, reviewer) -> None:
    answer = client.post("/api/v1/flags/claim", json={"kind": "bogus"}, headers=reviewer.headers)
    assert answer.status_code == 422 and "duplicate_image" in answer.json()["detail"]


def test_pagination_caps(client: TestClient, pg_url: str, reviewer) -> None:
    kind = f"page_{uuid.uuid4().hex[:6]}"
    _, ids = _flags(pg_url, 120, kind)
    for path in ("/api/v1/flags", "/api/v1/listings", "/api/v1/me/history"):
        assert client.get(path, params={"page_size": 101}, headers=reviewer.headers).status_code == 422
        assert client.get(path, params={"page_size": 0}, headers=reviewer.headers).status_code == 422
    first = client.get("/api/v1/flags", params={"kind": kind, "page_size": 100, "order": "oldest"},
                       headers=reviewer.headers).json()
    second = client.get("/api/v1/flags", params={"kind": kind, "page_size": 100, "page": 2, "order": "oldest"},
                        headers=reviewer.headers).json()
    assert len(first["items"]) == 100 and len(second["items"]) == 20
    assert [f["id"] for f in first["items"] + second["items"]] == ids
    default = client.get("/api/v1/flags", params={"kind": kind}, headers=reviewer.headers).json()
    assert len(default["items"]) == 50


def test_queue_stats_and_severity_order(client: TestClient, pg_url: str, reviewer) -> None:
    _, low = _flags(pg_url, 1, "low_quality", score=0.9)
    _, high = _flags(pg_url, 1, "duplicate_image", score=0.9)
    items = client.get("/api/v1/flags", params={"status": "claimable", "page_size": 100},
                       headers=reviewer.headers).json()["items"]
    order = [f["id"] for f in items]
    assert order.index(high[0]) < order.index(low[0])  # weight 0.6 x 0.9 before 0.05 x 0.9
    stats = client.get("/api/v1/flags/stats", headers=reviewer.headers).json()
    assert stats["by_status"]["open"] >= 2 and stats["by_kind"]["duplicate_image"]["open"] >= 1


def test_listings_filters_and_detail(client: TestClient, pg_url: str, reviewer) -> None:
    seller = f"seller-{uuid.uuid4().hex[:6]}"
    with transaction(pg_url) as session:
        a = m.Listing(external_id=f"A-{seller}", seller_id=seller, title="a", category="shoes", status="done",
                      fraud_decision="review")
        b = m.Listing(external_id=f"B-{seller}", seller_id=seller, title="b", category="bags", status="pending")
        session.add_all([a, b])
        session.flush()
        img = m.Image(listing_id=a.id, url="https://img.example/a.jpg", status="done", width=100, height=80)
        session.add(img)
        session.flush()
        session.add(m.Tag(listing_id=a.id, image_id=img.id, name="sneaker", score=0.8, source="tagging",
                          model_version="tagger@1"))
        session.add(m.Detection(image_id=img.id, label="shoe", score=0.7, x0=1, y0=2, x1=50, y1=60,
                                model_version="det@1"))
    h = reviewer.headers
    assert len(client.get("/api/v1/listings", params={"seller": seller}, headers=h).json()["items"]) == 2
    only = client.get("/api/v1/listings", params={"seller": seller, "decision": "review"}, headers=h).json()
    assert [x["id"] for x in only["items"]] == [f"A-{seller}"]
    cat = client.get("/api/v1/listings", params={"seller": seller, "category": "bags"}, headers=h).json()
    assert [x["id"] for x in cat["items"]] == [f"B-{seller}"]
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    assert client.get("/api/v1/listings", params={"seller": seller, "since": future}, headers=h).json()["total"] == 0
    assert client.get("/api/v1/listings", params={"status": "bogus"}, headers=h).status_code == 422
    detail = client.get(f"/api/v1/listings/A-{seller}", headers=h).json()
    image = detail["images"][0]
    assert image["tags"][0] == {"id": image["tags"][0]["id"], "name": "sneaker", "score": 0.8,
                                "source": "tagging", "model_version": "tagger@1"}
    assert image["detections"][0]["box"] == [1.0, 2.0, 50.0, 60.0]
    assert client.get("/api/v1/listings/nope-404", headers=h).status_code == 404

    # Tag review writes reviewed labels through worker.labels.
    confirm = client.post(f"/api/v1/images/{image['id']}/tags/sneaker/confirm", json={"note": "yes"}, headers=h)
    assert confirm.status_code == 201, confirm.text
    missing = client.post(f"/api/v1/images/{image['id']}/tags/hat/reject", headers=h)
    assert missing.status_code == 404 and "no tag 'hat'" in missing.json()["detail"]
    box = client.post(f"/api/v1/detections/{image['detections'][0]['id']}/correct",
                      json={"box": [2, 3, 40, 50]}, headers=h)
    assert box.status_code == 201, box.text
    history = client.get(f"/api/v1/images/{image['id']}/labels", headers=h).json()
    assert {(x["kind"], x["action"], x["reviewer"]) for x in history} >= {
        ("tag", "confirm", reviewer.name), ("box", "correct", reviewer.name)}
