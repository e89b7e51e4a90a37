"""Issue 12 item 5: an image reference the worker cannot use fails that image alone.

The event is accepted by the intake layer, its listing and every image row are stored, the
good photo is analysed, and each unsupported reference ends ``failed`` with a
``bad_reference`` error, on the production database (Postgres).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from db import models as m
from db.session import session_factory
from tests.support.http import LocalImageServer
from tests.support.images import write_photo
from tests.support.services import unique
from worker.config import Settings
from worker.intake.events import parse_event
from worker.pipeline.analyze import analyze_image
from worker.pipeline.events import apply_event

UNSUPPORTED = ["ftp://cdn.example.com/a.jpg", "gopher://cdn.example.com/1", "data:image/png;base64,iVBORw0KGgo=",
               "photos/relative.jpg"]


def test_unsupported_references_fail_per_image_and_the_good_photo_is_analysed(
        pg_url: str, tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    write_photo(tmp_path / "good.jpg", size=(160, 120))
    with LocalImageServer(tmp_path) as server:
        settings = make_settings(database_url=pg_url, fetch_allow_hosts=[server.allow_entry])
        good = server.url("/good.jpg")
        event = parse_event({
            "event_id": unique("ev"), "type": "listing.created", "occurred_at": "2026-11-29T12:00:00Z",
            "listing": {"id": unique("L"), "seller_id": "S", "images": [UNSUPPORTED[0], good, *UNSUPPORTED[1:]]},
        })
        factory = session_factory(pg_url)
        with factory() as session, session.begin():
            outcome = apply_event(session, event)
        assert len(outcome.images_to_analyze) == 5
        for image_id in outcome.images_to_analyze:
            with factory() as session:
                analyze_image(session, image_id, settings)

    with factory() as session:
        listing = session.get(m.Listing, outcome.listing_id)
        assert listing is not None
        rows = {img.url: img for img in session.scalars(select(m.Image).where(m.Image.listing_id == listing.id))}
        assert rows[good].status == "done" and rows[good].width == 160
        for ref in UNSUPPORTED:
            assert rows[ref].status == "failed", ref
            assert (rows[ref].error or "").startswith("bad_reference: "), rows[ref].error
        assert listing.status == "done"
