"""The review pages: queue by severity, the contact-info flag with its OCR boxes, escaping of
what sellers wrote, page security headers, the reviewer's history."""

from __future__ import annotations

import json
import uuid

from fastapi.testclient import TestClient

from db import models as m
from db.session import transaction


def _flag(pg_url: str, kind: str, score: float, evidence: dict) -> int:
    with transaction(pg_url) as session:
        listing = m.Listing(external_id=f"ext-{uuid.uuid4().hex[:10]}", seller_id="s", title="")
        session.add(listing)
        session.flush()
        img = m.Image(listing_id=listing.id, url="https://img.example/p.jpg", status="done", width=640, height=480)
        session.add(img)
        session.flush()
        flag = m.Flag(listing_id=listing.id, image_id=img.id, kind=kind, score=score, evidence=evidence)
        session.add(flag)
        session.flush()
        return flag.id


def test_contact_flag_page_draws_the_ocr_boxes_and_escapes_text(client: TestClient, pg_url: str, reviewer,
                                                                log_in) -> None:
    evil = "<script>alert(1)</script>"
    flag_id = _flag(pg_url, "contact_info", 0.9, {
        "summary": f"Contact details: {evil}",
        "matches": [{"type": "phone", "text": "+49 30 1234567", "box": [10.0, 20.0, 200.0, 60.0],
                     "confidence": 0.9}]})
    log_in(client, reviewer.name)
    page = client.get(f"/review/flags/{flag_id}")
    assert page.status_code == 200
    assert evil not in page.text and "&lt;script&gt;" in page.text
    boxes_attr = page.text.split("data-boxes='")[1].split("'")[0]
    boxes = json.loads(boxes_attr.replace("&#34;", '"').replace("&quot;", '"'))
    assert boxes == [{"box": [10.0, 20.0, 200.0, 60.0], "label": "phone: +49 30 1234567"}]
    assert 'data-w="640" data-h="480"' in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-frame-options"] == "DENY"


def test_queue_page_orders_by_severity_and_history_shows_my_decision(client: TestClient, pg_url: str, reviewer,
                                                                     log_in) -> None:
    low = _flag(pg_url, "low_quality", 0.99, {"summary": "blurry"})
    high = _flag(pg_url, "nsfw", 0.9, {"summary": "nsfw"})
    csrf = log_in(client, reviewer.name)
    page = client.get("/review").text
    assert page.index(f"/review/flags/{high}") < page.index(f"/review/flags/{low}")
    done = client.post(f"/review/flags/{high}/decide", data={"verdict": "dismissed", "note": "a statue",
                                                             "csrf_token": csrf}, follow_redirects=False)
    assert done.status_code == 303
    history = client.get("/review/history").text
    assert f"#{high}" in history and "dismissed" in history and "a statue" in history
    # n: claim the next flag -> its page
    nxt = client.post("/review/next", data={"csrf_token": csrf}, follow_redirects=False)
    assert nxt.status_code == 303 and nxt.headers["location"].startswith("/review/flags/")


def test_listing_page_shows_detection_boxes_cutout_and_tags(client: TestClient, pg_url: str, reviewer,
                                                            log_in) -> None:
    external = f"ext-{uuid.uuid4().hex[:10]}"
    with transaction(pg_url) as session:
        listing = m.Listing(external_id=external, seller_id="s", title="red shoe", status="done")
        session.add(listing)
        session.flush()
        img = m.Image(listing_id=listing.id, url="https://img.example/p.jpg", status="done", width=100, height=80)
        session.add(img)
        session.flush()
        session.add(m.Detection(image_id=img.id, label="shoe", score=0.8, x0=1, y0=2, x1=50, y1=60,
                                model_version="det@1"))
        session.add(m.Tag(listing_id=listing.id, image_id=img.id, name="sneaker", score=0.7, source="tagging",
                          model_version="tagger@1"))
        art = m.ArtifactRecord(image_id=img.id, kind="cutout", path="/nowhere.png", model_version="seg@1")
        session.add(art)
        session.flush()
        art_id = art.id
    log_in(client, reviewer.name)
    page = client.get(f"/review/listings/{external}")
    assert page.status_code == 200
    boxes = json.loads(page.text.split("data-boxes='")[1].split("'")[0].replace("&#34;", '"'))
    assert boxes[0]["label"] == "shoe" and boxes[0]["box"] == [1.0, 2.0, 50.0, 60.0]
    assert f"/api/v1/artifacts/{art_id}" in page.text and "tagger@1" in page.text
    assert client.get("/review/listings/nope").status_code == 404
