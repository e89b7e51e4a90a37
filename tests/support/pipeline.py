"""Helpers shared by the pipeline tests: events, small photos, applying events and analysing
images each in their own session, the way the Celery tasks do."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import func, select

from db.session import session_factory
from tests.support.services import unique
from worker.config import Settings
from worker.intake.events import parse_event
from worker.pipeline.analyze import ImageOutcome, analyze_image
from worker.pipeline.events import EventOutcome, apply_event


def event(listing_id: str, images: list[str], *, etype: str = "listing.created", event_id: str | None = None,
          seller: str = "s1", at: datetime | None = None, category: str | None = "kitchenware") -> dict[str, Any]:
    return {
        "event_id": event_id or unique("ev"),
        "type": etype,
        "occurred_at": (at or datetime.now(UTC)).isoformat(),
        "listing": {"id": listing_id, "seller_id": seller, "title": "t", "category": category,
                    "images": images},
    }


def photo(path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 48)) -> str:
    img = Image.new("RGB", size, colour)
    for x in range(0, size[0], 8):  # some structure so hashes are not degenerate
        img.paste((x * 3 % 255, 90, 160), (x, 0, x + 4, size[1]))
    img.save(path)
    return str(path)


def apply(url: str, payload: dict[str, Any]) -> EventOutcome:
    factory = session_factory(url)
    with factory() as session, session.begin():
        return apply_event(session, parse_event(payload))


def analyze_all(url: str, settings: Settings, ids: list[int]) -> list[ImageOutcome]:
    factory = session_factory(url)
    out = []
    for image_id in ids:
        with factory() as session:
            out.append(analyze_image(session, image_id, settings))
    return out


def count(url: str, model: Any, *where: Any) -> int:
    with session_factory(url)() as session:
        return int(session.execute(select(func.count()).select_from(model).where(*where)).scalar_one())
