"""Write ``listing.processed`` into the outbox, inside the caller's transaction.

Called with the listing row locked (the lock order of worker/pipeline/store.py), right after
the listing's final state was set: when its last image finished (``processed``) and when its
fraud score was recomputed after a review verdict or a re-score (``rescored``). The row commits
with that state or not at all.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from db import models as m
from worker.config import Settings
from worker.outbound.schema import EVENT_TYPE, REASONS, SCHEMA_VERSION, validate_payload

log = logging.getLogger(__name__)


def outbound_enabled(settings: Settings) -> bool:
    """Whether events are recorded at all: a results stream or a webhook is configured. Local
    runs with the embedded broker and neither write nothing (and never need Redis)."""
    return settings.effective_results_redis_url is not None or bool(settings.webhook_url)


def iso(value: datetime | None) -> str | None:
    """RFC 3339 in UTC; SQLite hands back naive datetimes, which are UTC here."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def encode(payload: dict[str, Any]) -> str:
    """The exact bytes (as text) sent to the stream and the webhook, and signed."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def failure_code(error: str | None) -> str | None:
    if not error:
        return None
    code, sep, _ = error.partition(":")
    return code.strip() if sep else None


#: The image columns a ``listing.processed`` payload reports (and the listing's finish reads).
IMAGE_COLUMNS = (m.Image.id, m.Image.position, m.Image.url, m.Image.status, m.Image.complete, m.Image.error)
#: The flag columns the payload reports (and the fraud score reads: kind, score, status).
FLAG_COLUMNS = (m.Flag.id, m.Flag.kind, m.Flag.score, m.Flag.status, m.Flag.image_id, m.Flag.model_version)


def listing_images(session: Session, listing_id: int) -> list[Any]:
    """The listing's images as rows of :data:`IMAGE_COLUMNS`, by position then id (plain rows,
    not ORM objects: the finish of a listing reads them once for the pending check, the
    decision and the payload). Flush first: the rows are read as the database has them."""
    return list(session.execute(select(*IMAGE_COLUMNS).where(m.Image.listing_id == listing_id)
                                .order_by(m.Image.position, m.Image.id)))


def listing_flags(session: Session, listing_id: int) -> list[Any]:
    """The listing's flags as rows of :data:`FLAG_COLUMNS`, in the database's order (the order
    the fraud score always read them in; the payload sorts them by id)."""
    return list(session.execute(select(*FLAG_COLUMNS).where(m.Flag.listing_id == listing_id)))


def build_listing_processed(session: Session, listing: m.Listing, reason: str,
                            event_id: str | None = None, *, images: list[Any] | None = None,
                            flags: list[Any] | None = None) -> dict[str, Any]:
    """The event's JSON from what is stored now (validated against the published schema).

    ``images``/``flags``: rows of :func:`listing_images`/:func:`listing_flags` the caller read
    in this transaction after its last change to them (the listing's finish reads them once for
    the score, the decision and this payload); read here when not given."""
    if reason not in REASONS:
        raise ValueError(f"reason must be one of {REASONS}, not {reason!r}")
    session.flush()
    if images is None:
        images = listing_images(session, listing.id)
    if flags is None:
        flags = listing_flags(session, listing.id)
    tags = session.execute(
        select(m.Tag.name, m.Tag.score, m.Tag.source, m.Tag.image_id, m.Tag.model_version)
        .where(m.Tag.listing_id == listing.id).order_by(m.Tag.id)
    ).all()
    runs = session.execute(
        select(m.StepRunRecord.step, m.StepRunRecord.model_version).distinct()
        .join(m.Image, m.Image.id == m.StepRunRecord.image_id).where(m.Image.listing_id == listing.id)
    ).all()
    versions: dict[str, list[str]] = {}
    for step, version in runs:
        versions.setdefault(step, []).append(version)
    payload: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "event_id": event_id or str(uuid.uuid4()),
        "type": EVENT_TYPE,
        "reason": reason,
        "occurred_at": iso(m.utcnow()),
        "source_event_id": listing.last_event_id,
        "listing": {"id": listing.external_id, "internal_id": listing.id, "seller_id": listing.seller_id,
                    "category": listing.category, "status": listing.status},
        "processed_at": iso(listing.processed_at),
        "decision": listing.fraud_decision,
        "fraud_score": listing.fraud_score,
        "images": [{"id": image.id, "position": image.position, "url": image.url, "status": image.status,
                    "complete": image.complete,
                    "failure_code": failure_code(image.error) if image.status == "failed" else None,
                    "error": image.error if image.status == "failed" else None} for image in images],
        "tags": [{"name": tag.name, "score": tag.score, "source": tag.source, "image_id": tag.image_id,
                  "model_version": tag.model_version} for tag in tags],
        "flags": [{"id": flag.id, "kind": flag.kind, "score": flag.score, "status": flag.status,
                   "image_id": flag.image_id, "model_version": flag.model_version}
                  for flag in sorted(flags, key=lambda flag: flag.id)],
        "model_versions": {step: sorted(found) for step, found in sorted(versions.items())},
    }
    validate_payload(payload)
    return payload


def record_listing_event(session: Session, listing: m.Listing, settings: Settings, reason: str, *,
                         images: list[Any] | None = None, flags: list[Any] | None = None) -> str | None:
    """Add a ``listing.processed`` row to the outbox in the caller's transaction; return its
    event id, or None when nothing was recorded (no target configured, or this completion was
    already recorded). ``images``/``flags``: as for :func:`build_listing_processed`.

    A ``processed`` event is recorded once per completion: its dedupe key is the listing and
    the listing event that led to the completion, inserted with ON CONFLICT DO NOTHING (a
    redelivered image that finds its listing done again records nothing, and never fails)."""
    if not outbound_enabled(settings):
        return None
    payload = build_listing_processed(session, listing, reason, images=images, flags=flags)
    dedupe_key = None
    if reason == "processed":
        completion = listing.last_event_id or iso(listing.processed_at) or payload["event_id"]
        dedupe_key = f"{EVENT_TYPE}:{listing.id}:{completion}"[:255]
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    stmt = insert(m.OutboxEvent).values(
        event_id=payload["event_id"], type=EVENT_TYPE, dedupe_key=dedupe_key, listing_id=listing.id,
        listing_external_id=listing.external_id, reason=reason, payload=payload, created_at=m.utcnow(),
        attempts=0, webhook_attempts=0, webhook_status="pending" if settings.webhook_url else None,
    ).on_conflict_do_nothing().returning(m.OutboxEvent.id)
    if session.execute(stmt).scalar_one_or_none() is None:
        log.info("listing %s: %s (%s) already recorded", listing.external_id, EVENT_TYPE, reason)
        return None
    log.info("listing %s: %s (%s) recorded as event %s, decision %s", listing.external_id, EVENT_TYPE,
             reason, payload["event_id"], listing.fraud_decision)
    return str(payload["event_id"])
