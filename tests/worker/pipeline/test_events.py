"""Applying listing events (idempotency, deletes, stale events) on both databases, and the
rollback-per-test fixture the Postgres tests rely on."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from db import models as m
from db.session import get_engine, session_factory
from tests.support.pipeline import apply, count, event, photo
from tests.support.services import unique
from worker.intake.events import parse_event
from worker.pipeline.events import apply_event


def test_same_event_three_times_gives_one_set_of_rows(db_url: str, tmp_path: Path) -> None:
    listing = unique("L")
    payload = event(listing, [photo(tmp_path / "a.png"), photo(tmp_path / "b.png", (0, 200, 0))])
    outcomes = [apply(db_url, payload) for _ in range(3)]
    assert [o.outcome for o in outcomes] == ["applied", "duplicate", "duplicate"]
    # A redelivered event re-announces the images still pending (lost enqueue after commit).
    assert outcomes[1].images_to_analyze == outcomes[0].images_to_analyze
    lid = outcomes[0].listing_id
    assert count(db_url, m.Listing, m.Listing.external_id == listing) == 1
    assert count(db_url, m.Image, m.Image.listing_id == lid) == 2
    assert count(db_url, m.ProcessedEvent, m.ProcessedEvent.event_id == payload["event_id"]) == 1


def test_delete_and_stale_events(db_url: str, tmp_path: Path) -> None:
    listing = unique("L")
    t0 = datetime.now(UTC)
    created = apply(db_url, event(listing, [photo(tmp_path / "a.png")], at=t0))
    deleted = apply(db_url, event(listing, [], etype="listing.deleted", at=t0 + timedelta(seconds=5)))
    assert deleted.outcome == "applied"
    late = apply(db_url, event(listing, [photo(tmp_path / "z.png")], etype="listing.updated",
                               at=t0 + timedelta(seconds=1)))
    assert late.outcome == "stale" and late.images_to_analyze == []
    with session_factory(db_url)() as session:
        assert session.get_one(m.Listing, created.listing_id).status == "deleted"


# --- the pg_session fixture -----------------------------------------------------------------

@pytest.fixture
def rows_vanish_after_the_test(pg_url: str) -> Iterator[list[str]]:
    """Requested BEFORE pg_session, so its teardown runs AFTER pg_session's rollback: the
    listings the test committed through pg_session must then be gone from the database."""
    written: list[str] = []
    yield written
    with session_factory(pg_url)() as fresh:
        left = fresh.execute(
            select(m.Listing.external_id).where(m.Listing.external_id.in_(written))
        ).scalars().all()
    assert written, "the test recorded nothing to check"
    assert left == [], f"pg_session let committed rows through to the shared database: {left}"


@pytest.mark.postgres
def test_pg_session_rolls_back_what_the_code_under_test_commits(
        rows_vanish_after_the_test: list[str], pg_session: Session, pg_url: str) -> None:
    ext = unique("L")
    with pg_session.begin():  # the code under test commits...
        apply_event(pg_session, parse_event(event(ext, [])))
    rows_vanish_after_the_test.append(ext)
    # ...and sees its own rows afterwards,
    assert pg_session.execute(select(m.Listing).where(m.Listing.external_id == ext)).scalar_one().status == "done"
    # while no other connection does: the commit was a savepoint release inside the outer
    # transaction, which is still open.
    assert pg_session.connection().in_transaction()
    with get_engine(pg_url).connect() as other:
        assert other.execute(select(m.Listing.id).where(m.Listing.external_id == ext)).first() is None


def test_a_dead_letter_with_a_nul_character_is_stored(db_url: str) -> None:
    """`catalog submit` stores what it rejects; a raw NUL made the Postgres insert fail."""
    from worker.pipeline.events import record_dead_letter

    source = unique("file.jsonl#0")
    with session_factory(db_url)() as session, session.begin():
        record_dead_letter(session, source, '{"event_id": "a\x00b"}', "reason with \x00 too")
    with session_factory(db_url)() as session:
        stored = session.execute(select(m.DeadLetter).where(m.DeadLetter.source == source)).scalar_one()
    assert stored.payload == '{"event_id": "a\\x00b"}' and stored.reason == "reason with \\x00 too"
