"""`catalog status` counts what an operator must see (issue 12, items 8 and 12): images being
analysed, leases that ran out, images re-queued after their run died, done images whose
analysis was incomplete, and messages delivered but not acknowledged."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from db import models as m
from db.migrate import upgrade
from db.session import session_factory
from tests.support.pipeline import apply, event, photo
from tests.support.services import REDIS_URL, TrackingRedis
from worker.pipeline.analyze import claim_image
from worker.pipeline.lease import Holder
from worker.reports.status import UNACKED_INDEX_KEY, UNACKED_KEY, broker_status, database_status, render


@pytest.fixture(params=["sqlite", "postgres"])
def own_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database of this test's own: status counts every row, so a shared one would not do."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'status.db'}"
    else:
        url = request.getfixturevalue("fresh_pg_url")
    upgrade(url)
    yield url


def test_status_counts_leases_and_incomplete_images(own_db: str, tmp_path: Path, make_settings) -> None:
    settings = make_settings(database_url=own_db, fetch_allow_dirs=[str(tmp_path)])
    refs = [photo(tmp_path / f"{i}.png", (i * 40, 9, 9)) for i in range(5)]
    out = apply(own_db, event("L-status", refs))
    analysing, expired, requeued, incomplete, queued = out.images_to_analyze
    factory = session_factory(own_db)
    for image_id in (analysing, expired, requeued):
        with factory() as session:
            claim_image(session, image_id, settings, Holder(f"task-{image_id}"), max_attempts=3)
    with factory() as session, session.begin():
        session.execute(update(m.Image).where(m.Image.id == expired)
                        .values(lease_expires_at=m.utcnow() - timedelta(seconds=5)))
        session.execute(update(m.Image).where(m.Image.id == requeued).values(lease_expires_at=None))
        session.execute(update(m.Image).where(m.Image.id == incomplete)
                        .values(status="done", complete=False))

    status = database_status(make_settings(database_url=own_db))
    assert status["images"] == {"pending": 4, "done": 1}
    assert status["images_incomplete"] == 1
    assert status["images_in_flight"] == {"analysing": 1, "lease_expired": 1, "requeued_after_death": 1}
    assert queued not in (analysing, expired, requeued)  # queued: pending with no lease, in none of these
    text = render(status)
    assert "images_in_flight" in text and "lease_expired=1" in text


def test_status_shows_unacknowledged_messages(redis_client: TrackingRedis, make_settings) -> None:
    """A killed worker's messages sit in Redis's unacked set, invisible to queue lengths."""
    old = time.time() - 600
    redis_client.hset(UNACKED_KEY, "test-tag-1", "{}")
    redis_client.zadd(UNACKED_INDEX_KEY, {"test-tag-1": old})
    try:
        status = broker_status(make_settings(broker_url=REDIS_URL, redis_url=REDIS_URL,
                                             events_stream="status-test:none"))
    finally:
        redis_client.hdel(UNACKED_KEY, "test-tag-1")
        redis_client.zrem(UNACKED_INDEX_KEY, "test-tag-1")
    assert status["unacked"]["messages"] >= 1
    assert status["unacked"]["oldest_age_s"] >= 599
