"""Apply listing events to the database (idempotently).

* an event id is recorded in ``processed_events`` in the same transaction as its effects, so a
  redelivered event changes nothing: it only re-announces images still pending that no live
  run holds (their message may have been lost between commit and enqueue); an image being
  analysed right now is never announced again;
* an event older than the last applied one for its listing is recorded as ``stale`` and ignored;
* ``listing.deleted`` ends the listing's pending images: ``failed`` with ``listing_deleted: ...``
  (a run analysing one of them then drops its results);
* the listing row is locked before any of its images is written (the lock order of
  ``worker.pipeline.store``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import or_, select, update
from sqlalchemy.dialects.postgresql import Insert as PgInsert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import Insert as SqliteInsert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from db import models as m
from worker.config import get_settings
from worker.intake.events import ListingEvent, printable
from worker.outbound.outbox import record_listing_event
from worker.pipeline.lease import db_now
from worker.pipeline.store import LISTING_DELETED, end_pending_images
from worker.search.vectors import remove_listing_vectors

log = logging.getLogger(__name__)


@dataclass
class EventOutcome:
    event_id: str
    outcome: str  # applied | duplicate | stale
    listing_id: int | None
    images_to_analyze: list[int] = field(default_factory=list)


def _insert(session: Session, model: type[m.Base]) -> PgInsert | SqliteInsert:
    """INSERT with the dialect's ON CONFLICT support (both dialects spell it the same)."""
    if session.get_bind().dialect.name == "postgresql":
        return pg_insert(model)
    return sqlite_insert(model)


def apply_event(session: Session, event: ListingEvent) -> EventOutcome:
    """Apply one validated event. Call inside a transaction; the caller commits."""
    inserted = session.execute(
        _insert(session, m.ProcessedEvent)
        .values(
            event_id=event.event_id,
            type=event.type,
            listing_external_id=event.listing.id,
            occurred_at=event.occurred_at,
            received_at=m.utcnow(),
            outcome="applied",
        )
        .on_conflict_do_nothing(index_elements=["event_id"])
        .returning(m.ProcessedEvent.event_id)
    ).first()
    if inserted is None:
        return _redelivered(session, event)

    # Make sure the listing row exists, then lock it: concurrent events for one listing
    # apply one after the other. A listing this INSERT creates comes back from it (an inserted
    # row is locked by its transaction until the commit) and has no images yet; an existing one
    # is locked by the SELECT ... FOR UPDATE.
    listing = session.execute(
        _insert(session, m.Listing)
        .values(
            external_id=event.listing.id,
            seller_id=event.listing.seller_id,
            title=event.listing.title,
            category=event.listing.category,
            status="pending",
            created_at=m.utcnow(),
            updated_at=m.utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["external_id"])
        .returning(m.Listing)
    ).scalar_one_or_none()
    if listing is not None:
        set_committed_value(listing, "images", [])  # new: nothing to load
    else:
        listing = session.execute(
            select(m.Listing).where(m.Listing.external_id == event.listing.id).with_for_update()
        ).scalar_one()

    if listing.last_event_at is not None and _aware(listing.last_event_at) > event.occurred_at:
        session.execute(
            update(m.ProcessedEvent)
            .where(m.ProcessedEvent.event_id == event.event_id)
            .values(outcome="stale")
        )
        log.info("event %s is older than the last applied one for listing %s; ignored",
                 event.event_id, event.listing.id)
        return EventOutcome(event.event_id, "stale", listing.id)

    listing.last_event_id = event.event_id
    listing.last_event_at = event.occurred_at
    if event.type == "listing.deleted":
        listing.status = "deleted"
        ended = end_pending_images(session, listing.id, LISTING_DELETED)
        remove_listing_vectors(session, listing.id)  # out of the visual search index at this commit
        if ended:
            log.info("listing %s deleted: %d pending image(s) failed with listing_deleted", event.listing.id, ended)
        return EventOutcome(event.event_id, "applied", listing.id)

    listing.seller_id = event.listing.seller_id
    listing.title = event.listing.title
    listing.category = event.listing.category
    images = _sync_images(session, listing, event.listing.images)
    if images:
        listing.status = "processing"
        listing.processed_at = None
    else:
        listing.status = "done"
        listing.processed_at = m.utcnow()
        # Nothing to analyse: finished right here (listing.processed, in this transaction).
        record_listing_event(session, listing, get_settings(), "processed")
    session.flush()  # one flush: the listing row once, the new image rows as one multi-row INSERT
    return EventOutcome(event.event_id, "applied", listing.id, [img.id for img in images])


def _sync_images(session: Session, listing: m.Listing, refs: list[str]) -> list[m.Image]:
    """Make the listing's image rows match ``refs`` (not flushed: the caller flushes once).
    New URLs get new rows; URLs that stayed are re-checked (the task skips the models when the
    bytes are unchanged); removed URLs lose their rows and results. Returns the images to
    analyse, in the order of ``refs``: every one of them."""
    wanted: list[str] = list(dict.fromkeys(refs))  # de-duplicate, keep order
    with session.no_autoflush:  # the listing row is written once, by the caller's flush
        existing = {img.url: img for img in listing.images}
    for url, old in existing.items():
        if url not in wanted:
            session.delete(old)
    images = []
    for position, url in enumerate(wanted):
        img = existing.get(url)
        if img is None:
            img = m.Image(listing=listing, url=url, position=position, status="pending")
            session.add(img)
        else:
            # A new version of the image: analysed afresh. A run still analysing the old one
            # loses its lease, so it cannot store results fetched before this event.
            img.position = position
            img.status = "pending"
            img.error = None
            img.attempts = 0
            img.complete = None
            img.lease_owner = None
            img.lease_expires_at = None
        images.append(img)
    return images


def _redelivered(session: Session, event: ListingEvent) -> EventOutcome:
    """The event was applied before. Its images may not have been announced (the process
    died between commit and enqueue), so report the ones still pending -- except those a
    live run holds (being analysed right now: announcing them again would only make a
    duplicate message). Nothing is written, so nothing is locked."""
    listing = session.execute(
        select(m.Listing).where(m.Listing.external_id == event.listing.id)
    ).scalar_one_or_none()
    if listing is None:
        return EventOutcome(event.event_id, "duplicate", None)
    now = db_now(session)
    pending = session.execute(
        select(m.Image.id).where(
            m.Image.listing_id == listing.id, m.Image.status == "pending",
            or_(m.Image.lease_expires_at.is_(None), m.Image.lease_expires_at <= now),
        ).order_by(m.Image.position, m.Image.id)
    ).scalars().all()
    return EventOutcome(event.event_id, "duplicate", listing.id, list(pending))


def record_dead_letter(session: Session, source: str, payload: str, reason: str) -> None:
    # printable: a raw NUL in a `catalog submit` payload would make the Postgres insert fail.
    session.add(m.DeadLetter(source=source, payload=printable(payload[:100_000]), reason=printable(reason)))


def _aware(value: datetime) -> datetime:
    # SQLite returns naive datetimes; everything we store is UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)
