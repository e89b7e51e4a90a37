from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.intake.events import InvalidEvent, json_schema, parse_event

GOOD = {
    "event_id": "e1",
    "type": "listing.created",
    "occurred_at": "2026-11-29T12:00:00Z",
    "listing": {"id": "L1", "seller_id": "S1", "title": "cup", "category": None,
                "images": ["https://cdn.example.com/a.jpg", "file:///tmp/b.png", "/srv/c.jpg"]},
}


def test_valid_event_parses() -> None:
    ev = parse_event(json.dumps(GOOD))
    assert ev.type == "listing.created" and ev.listing.images[2] == "/srv/c.jpg"
    assert ev.occurred_at.tzinfo is not None


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda e: e.update(type="listing.sold"), "type"),
        (lambda e: e.pop("event_id"), "event_id"),
        (lambda e: e.update(occurred_at="2026-11-29T12:00:00"), "timezone"),
        (lambda e: e.update(occurred_at="yesterday"), "occurred_at"),
        (lambda e: e["listing"].update(images=["relative/path.jpg"]), "not an http"),
        (lambda e: e["listing"].update(images=["ftp://x/y.jpg"]), "not an http"),
        (lambda e: e["listing"].update(images=["/a.jpg"] * 51), "images"),
        (lambda e: e["listing"].pop("seller_id"), "seller_id"),
    ],
)
def test_invalid_events_have_readable_reasons(mutate, reason: str) -> None:  # noqa: ANN001
    data = json.loads(json.dumps(GOOD))
    mutate(data)
    with pytest.raises(InvalidEvent, match=reason):
        parse_event(json.dumps(data))


@pytest.mark.parametrize("raw", ["{not json", "[1, 2]", b"\xff\xfe"])
def test_garbage_is_invalid(raw) -> None:  # noqa: ANN001
    with pytest.raises(InvalidEvent):
        parse_event(raw)


def test_documented_schema_matches_the_code() -> None:
    doc = Path(__file__).resolve().parents[3] / "docs" / "events.schema.json"
    assert json.loads(doc.read_text()) == json_schema(), "regenerate with `catalog events-schema`"
