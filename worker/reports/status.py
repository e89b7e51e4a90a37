"""`catalog status`: backlog, failures and queues at a glance (for operators and alerts)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select

from db import models as m
from db.session import transaction
from worker.config import Settings

#: Keys kombu's Redis transport keeps delivered-but-unacknowledged messages under.
UNACKED_KEY, UNACKED_INDEX_KEY = "unacked", "unacked_index"


def database_status(settings: Settings) -> dict[str, Any]:
    with transaction(settings.effective_database_url) as session:
        def grouped(column, *where) -> dict[str, int]:
            rows = session.execute(select(column, func.count()).where(*where).group_by(column))
            return {str(key): count for key, count in rows}

        def count(*where) -> int:
            return int(session.execute(select(func.count()).select_from(m.Image).where(*where)).scalar_one())

        is_pg = session.get_bind().dialect.name == "postgresql"
        code = func.split_part(m.Image.error, ":", 1) if is_pg else \
            func.substr(m.Image.error, 1, func.instr(m.Image.error, ":") - 1)
        now = session.execute(select(func.now())).scalar_one() if is_pg else datetime.now(UTC)
        pending = m.Image.status == "pending"
        return {
            "listings": grouped(m.Listing.status),
            "images": grouped(m.Image.status),
            # done, but a step failed, was unavailable or was skipped (images.complete = false)
            "images_incomplete": count(m.Image.status == "done", m.Image.complete.is_(False)),
            # pending images by what their lease says (worker/pipeline/lease.py)
            "images_in_flight": {
                "analysing": count(pending, m.Image.lease_expires_at > now),
                "lease_expired": count(pending, m.Image.lease_expires_at <= now),
                "requeued_after_death": count(pending, m.Image.lease_owner.is_not(None),
                                              m.Image.lease_expires_at.is_(None)),
            },
            "failed_images_by_code": grouped(code, m.Image.status == "failed"),
            "open_flags_by_kind": grouped(m.Flag.kind, m.Flag.status == "open"),
            "listings_by_fraud_decision": grouped(m.Listing.fraud_decision, m.Listing.fraud_decision.is_not(None)),
            "dead_letters": session.execute(select(func.count()).select_from(m.DeadLetter)).scalar_one(),
        }


def broker_status(settings: Settings) -> dict[str, Any]:
    from worker.celery_app import QUEUES

    if settings.embedded_broker:
        folder = settings.broker_dir / "queue"
        files = [p.name for p in folder.glob("*.msg")] if folder.exists() else []
        return {"broker": "filesystem", "queued": {q: sum(f.endswith(f".{q}.msg") for f in files) for q in QUEUES}}
    import redis

    client = redis.Redis.from_url(settings.effective_broker_url, socket_timeout=5)
    out: dict[str, Any] = {"broker": "redis", "queued": {q: client.llen(q) for q in QUEUES}}
    # Delivered to a worker and not acknowledged yet: running, reserved, waiting for a retry's
    # countdown, or held by a dead worker until CATALOG_VISIBILITY_TIMEOUT (the lease sweep
    # re-queues the images of the latter within minutes; the old messages then do nothing).
    oldest = client.zrange(UNACKED_INDEX_KEY, 0, 0, withscores=True)
    out["unacked"] = {"messages": client.hlen(UNACKED_KEY),
                      "oldest_age_s": round(time.time() - float(oldest[0][1])) if oldest else 0}
    events = redis.Redis.from_url(settings.effective_redis_url, socket_timeout=5)
    stream: dict[str, Any] = {"length": events.xlen(settings.events_stream),
                              "dead_letters": events.xlen(settings.dead_letter_stream)}
    for group in events.xinfo_groups(settings.events_stream) if stream["length"] else []:
        name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
        if name == settings.events_group:
            stream.update(pending=group["pending"], lag=group.get("lag"), consumers=group["consumers"])
    out["events_stream"] = stream
    return out


def render(status: dict[str, Any]) -> str:
    lines = []
    for key, value in status.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k}={v}" for k, v in value.items()) if value else "-"
            lines.append(f"{key:28} {inner}")
        else:
            lines.append(f"{key:28} {value}")
    return "\n".join(lines)
