"""The relay: publish committed outbox rows to the results stream, hand webhook rows out.

Runs after the transaction that wrote the rows committed (``tasks.outbound`` right after an
image task, and the beat sweep for whatever that missed: Redis down, a killed worker, events
recorded by the review service or the CLI). Each batch is taken with ``FOR UPDATE SKIP
LOCKED`` on Postgres so two relays do not publish the same rows at the same time; a relay that
dies between XADD and its commit leaves the rows unpublished and they are published again:
delivery is at least once and consumers dedupe by ``event_id``.

Stream entries: ``XADD <CATALOG_RESULTS_STREAM> MAXLEN ~ <CATALOG_RESULTS_MAXLEN> * event <json>
event_id <id> type listing.processed`` -- the ``event`` field holds the same bytes the webhook
POSTs and signs.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import redis
from sqlalchemy import and_, delete, or_, select
from sqlalchemy.orm import Session

from db import models as m
from db.session import transaction
from worker.config import Settings, redact_url
from worker.outbound.outbox import encode, outbound_enabled

log = logging.getLogger(__name__)

#: Rows taken per relay pass.
BATCH = 200

_clients: dict[str, redis.Redis] = {}
_clients_lock = threading.Lock()


@dataclass
class RelayReport:
    published: int = 0
    failed: int = 0
    error: str | None = None
    webhook_ids: list[int] = field(default_factory=list)
    pruned: int = 0


def _client(url: str) -> redis.Redis:
    with _clients_lock:
        client = _clients.get(url)
        if client is None:
            client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
            _clients[url] = client
        return client


def stream_fields(row: m.OutboxEvent) -> dict[str, str]:
    return {"event": encode(row.payload), "event_id": row.event_id, "type": row.type}


def relay(settings: Settings, *, limit: int = BATCH) -> RelayReport:
    """Publish up to ``limit`` unpublished rows and claim pending webhook rows; returns what
    happened and the outbox ids whose webhook delivery the caller enqueues (after this commit)."""
    report = RelayReport()
    if not outbound_enabled(settings):
        return report
    with transaction(settings.effective_database_url) as session:
        _publish(session, settings, limit, report)
        if settings.webhook_url:
            report.webhook_ids = _claim_webhooks(session, settings, limit)
    return report


def _publish(session: Session, settings: Settings, limit: int, report: RelayReport) -> None:
    rows = session.scalars(
        select(m.OutboxEvent).where(m.OutboxEvent.published_at.is_(None)).order_by(m.OutboxEvent.id)
        .limit(limit).with_for_update(skip_locked=True)
    ).all()
    if not rows:
        return
    url = settings.effective_results_redis_url
    now = m.utcnow()
    if url is None:  # the stream is off (the rows are there for the webhook): nothing owed to it
        for row in rows:
            row.published_at = now
        return
    try:
        pipe = _client(url).pipeline(transaction=False)
        for row in rows:
            fields: Any = stream_fields(row)
            pipe.xadd(settings.results_stream, fields,
                      maxlen=settings.results_maxlen or None, approximate=True)
        ids = pipe.execute()
    except redis.RedisError as exc:
        report.failed = len(rows)
        report.error = f"cannot publish to the results stream at {redact_url(url)}: {exc}"
        log.warning("%s; %d event(s) stay in the outbox and are retried", report.error, len(rows))
        for row in rows:
            row.attempts += 1
            row.last_error = report.error[:2000]
        return
    for row, entry_id in zip(rows, ids, strict=True):
        row.published_at = now
        row.stream_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        row.attempts += 1
        row.last_error = None
        log.info("listing %s: %s %s (%s) published to %s as %s", row.listing_external_id, row.type,
                 row.event_id, row.reason, settings.results_stream, row.stream_id)
    report.published = len(rows)


def requeue_after(settings: Settings) -> timedelta:
    """How long a webhook delivery handed to a task may stay unfinished before the sweep hands
    it out again (its message was lost): longer than all its retries can take."""
    return timedelta(seconds=settings.webhook_retry_max * (settings.webhook_retries + 1)
                     + settings.webhook_timeout * (settings.webhook_retries + 1) + 600)


def _claim_webhooks(session: Session, settings: Settings, limit: int) -> list[int]:
    stale = m.utcnow() - requeue_after(settings)
    rows = session.scalars(
        select(m.OutboxEvent).where(or_(
            m.OutboxEvent.webhook_status == "pending",
            and_(m.OutboxEvent.webhook_status == "queued", m.OutboxEvent.webhook_at < stale),
        )).order_by(m.OutboxEvent.id).limit(limit).with_for_update(skip_locked=True)
    ).all()
    now = m.utcnow()
    for row in rows:
        row.webhook_status, row.webhook_at = "queued", now
    return [row.id for row in rows]


def prune(settings: Settings) -> int:
    """Delete settled rows (published, webhook delivered or dead or none) older than
    CATALOG_OUTBOX_RETENTION_DAYS."""
    before = m.utcnow() - timedelta(days=settings.outbox_retention_days)
    with transaction(settings.effective_database_url) as session:
        result = session.execute(delete(m.OutboxEvent).where(
            m.OutboxEvent.created_at < before, m.OutboxEvent.published_at.is_not(None),
            or_(m.OutboxEvent.webhook_status.is_(None), m.OutboxEvent.webhook_status.in_(("delivered", "dead"))),
        ))
        return int(getattr(result, "rowcount", 0) or 0)
