"""Housekeeping finds pending images whose task was lost, once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from db import models as m
from db.session import session_factory
from tests.support.pipeline import apply, event, photo
from tests.support.services import unique
from worker.pipeline.sweep import stale_images


def test_stale_pending_images_are_found_once(db_url: str, tmp_path: Path) -> None:
    out = apply(db_url, event(unique("L"), [photo(tmp_path / "a.png")]))
    factory = session_factory(db_url)
    with factory() as session, session.begin():
        session.get_one(m.Image, out.images_to_analyze[0]).updated_at = datetime.now(UTC) - timedelta(hours=2)
    with factory() as session, session.begin():
        first = stale_images(session, timedelta(minutes=15))
    with factory() as session, session.begin():
        second = stale_images(session, timedelta(minutes=15))
    assert out.images_to_analyze[0] in first
    assert out.images_to_analyze[0] not in second
