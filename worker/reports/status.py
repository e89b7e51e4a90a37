"""`catalog status`: backlog, failures and queues at a glance (for operators and alerts)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from db import models as m
from db.session import transaction
from worker.config import Settings


def database_status(settings: Settings) -> dict[str, Any]:
    with transaction(settings.effective_database_url) as session:
        def grouped(column, *where) -> dict[str, int]:  # noqa: ANN001
            rows = session.execute(select(column, func.count()).where(*where).group_by(column))
            return {str(key): count for key, count in rows}

        code = func.substr(m.Image.error, 1, func.instr(m.Image.error, ":") - 1) \
            if session.get_bind().dialect.name == "sqlite" else func.split_part(m.Image.error, ":", 1)
        return {
            "listings": grouped(m.Listing.status),
            "images": grouped(m.Image.status),
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
