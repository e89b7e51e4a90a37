"""`catalog status`: backlog, failures and queues at a glance (for operators and alerts).

:func:`collect_status` is the whole report: :func:`database_status` (rows by status, failures,
rates, backlog), :func:`broker_status` (queue depths, the event stream),
:func:`workers_status` (the live workers, asked over Celery's remote control), and what follows
from them: one dead-letter count and a warning for every queue with work and no consumer.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db import models as m
from db.session import transaction
from worker.config import Settings

#: Keys kombu's Redis transport keeps delivered-but-unacknowledged messages under.
UNACKED_KEY, UNACKED_INDEX_KEY = "unacked", "unacked_index"

#: Windows, minutes, over which images finished per minute are shown.
RATE_WINDOWS_MIN = (1, 5, 15)
#: The window whose rate gives the backlog's ETA: long enough to smooth one slow image, short
#: enough to follow a worker that was added or stopped.
ETA_WINDOW_MIN = 5


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
            # Deprecated in the report (kept for scripts): events `catalog submit` rejected; the
            # one count to read is dead_lettered_events (collect_status).
            "dead_letters": session.execute(select(func.count()).select_from(m.DeadLetter)).scalar_one(),
            # listing.processed (worker/outbound): not yet on the results stream, webhook
            # deliveries still to make, and webhook deliveries given up (rows in dead_letters
            # whose source is ``webhook:<event id>``; they are results, not rejected events).
            "outbound": _outbound(session),
            **_rates(session, now, count(pending)),
        }


def _outbound(session: Session) -> dict[str, int]:
    def outbox(*where) -> int:
        return int(session.execute(select(func.count()).select_from(m.OutboxEvent).where(*where)).scalar_one())

    webhook_dead = session.execute(select(func.count()).select_from(m.DeadLetter)
                                   .where(m.DeadLetter.source.like("webhook:%"))).scalar_one()
    return {"unpublished": outbox(m.OutboxEvent.published_at.is_(None)),
            "webhook_pending": outbox(m.OutboxEvent.webhook_status == "pending"),
            "webhook_given_up": int(webhook_dead)}


def _rates(session: Session, now: datetime, pending: int) -> dict[str, Any]:
    """Images finished (done or failed, by ``images.processed_at``) per minute over the last
    1/5/15 minutes, and the backlog's ETA at the 5-minute rate (unknown when that is 0)."""
    per_min: dict[str, float] = {}
    for minutes in RATE_WINDOWS_MIN:
        since = now - timedelta(minutes=minutes)
        finished = session.execute(
            select(func.count()).select_from(m.Image)
            .where(m.Image.status.in_(("done", "failed")), m.Image.processed_at >= since)).scalar_one()
        per_min[f"{minutes}m"] = round(int(finished) / minutes, 2)
    rate = per_min[f"{ETA_WINDOW_MIN}m"]
    if pending == 0:
        eta_s: int | None = 0
        eta = "none (no backlog)"
    elif rate > 0:
        eta_s = round(pending / rate * 60)
        eta = _duration(eta_s)
    else:
        eta_s, eta = None, f"unknown (no image finished in the last {ETA_WINDOW_MIN} min)"
    return {"images_per_min": per_min,
            "backlog": {"pending_images": pending, "eta_s": eta_s, "eta": eta,
                        "at_images_per_min": rate}}


def _duration(seconds: int) -> str:
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


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


def workers_status(settings: Settings, timeout: float = 1.0) -> dict[str, Any] | None:
    """The live workers by node name: the queues each consumes, its pool and concurrency, asked
    over Celery's remote control (each node answers within ``timeout`` seconds or is not
    counted). None where that cannot be known: the filesystem broker has no remote control."""
    if settings.embedded_broker:
        return None
    from worker.celery_app import make_celery

    app = make_celery(settings)
    try:
        inspect = app.control.inspect(timeout=timeout)
        queues: dict[str, Any] = inspect.active_queues() or {}
        stats: dict[str, Any] = (inspect.stats() or {}) if queues else {}
    finally:
        app.close()
    workers: dict[str, Any] = {}
    for node in sorted(queues):
        pool = (stats.get(node) or {}).get("pool") or {}
        implementation = str(pool.get("implementation", ""))  # "celery.concurrency.prefork:TaskPool"
        workers[node] = {
            "queues": sorted((q["name"] for q in queues[node]), key=_queue_order),
            "pool": implementation.rpartition(".")[2].partition(":")[0] or None,
            "concurrency": pool.get("max-concurrency"),
        }
    return workers


def _queue_order(name: str) -> tuple[int, str]:
    from worker.celery_app import QUEUES

    return (QUEUES.index(name) if name in QUEUES else len(QUEUES), name)


def unconsumed_queue_warnings(queued: dict[str, int], workers: dict[str, Any]) -> list[str]:
    """One sentence per queue that holds messages while no live worker consumes it."""
    from worker.celery_app import IMAGES_QUEUE

    consumed = {q for info in workers.values() for q in info["queues"]}
    warnings = []
    for queue, depth in queued.items():
        if depth and queue not in consumed:
            hint = (f"start `catalog worker -Q {queue}`" if queue != IMAGES_QUEUE else
                    "start `catalog worker -Q images` (image analysis; on a CPU-only host "
                    "`catalog worker -Q ingest,images,cpu`)")
            warnings.append(f"queue {queue!r} holds {depth} message(s) and no live worker consumes it: {hint}")
    return warnings


def collect_status(settings: Settings, inspect_timeout: float = 1.0) -> dict[str, Any]:
    """The whole `catalog status` report. The broker side and the workers are best effort: when
    the broker cannot be reached the database side is still shown, with the error."""
    status = database_status(settings)
    status["warnings"] = []
    try:
        status.update(broker_status(settings))
    except Exception as exc:  # noqa: BLE001 - still show the database side
        status["broker_error"] = f"{type(exc).__name__}: {exc}"
    stream_dead = (status.get("events_stream") or {}).get("dead_letters")
    if "broker_error" in status and not settings.embedded_broker:
        status["dead_lettered_events"] = None  # the stream's part is unknown
    else:
        status["dead_lettered_events"] = _submit_dead_letters(status) + (stream_dead or 0)
    if "broker_error" in status:
        status["workers"] = None
        return status
    try:
        workers = workers_status(settings, inspect_timeout)
    except Exception as exc:  # noqa: BLE001 - the broker went away between the two looks
        status["workers"] = None
        status["workers_error"] = f"{type(exc).__name__}: {exc}"
        return status
    status["workers"] = workers
    if workers is not None:
        status["warnings"] = unconsumed_queue_warnings(status["queued"], workers)
    return status


#: Keys :func:`render` shows its own way (or, for deprecated counts, folds into one line).
_SPECIAL = frozenset({"warnings", "workers", "images_per_min", "backlog", "dead_letters",
                      "dead_lettered_events"})


def render(status: dict[str, Any]) -> str:
    lines = []
    for key, value in status.items():
        if key in _SPECIAL:
            continue
        if isinstance(value, dict):
            shown = {k: v for k, v in value.items() if not (key == "events_stream" and k == "dead_letters")}
            inner = ", ".join(f"{k}={v}" for k, v in shown.items()) if shown else "-"
            lines.append(f"{key:28} {inner}")
        else:
            lines.append(f"{key:28} {value}")
    if "images_per_min" in status:
        rates = ", ".join(f"{window}: {rate:g}" for window, rate in status["images_per_min"].items())
        lines.append(f"{'images finished per min':28} {rates}")
        backlog = status["backlog"]
        lines.append(f"{'backlog':28} {backlog['pending_images']} pending image(s), ETA {backlog['eta']}")
    if "dead_lettered_events" in status:
        lines.append(_render_dead_letters(status))
    if "workers" in status:
        lines.extend(_render_workers(status["workers"]))
    lines.extend(f"WARNING: {warning}" for warning in status.get("warnings") or [])
    return "\n".join(lines)


def _submit_dead_letters(status: dict[str, Any]) -> int:
    """Rows of table dead_letters that are rejected events (``catalog submit``), not webhook
    deliveries given up."""
    return int(status["dead_letters"]) - int((status.get("outbound") or {}).get("webhook_given_up") or 0)


def _render_dead_letters(status: dict[str, Any]) -> str:
    total = status["dead_lettered_events"]
    submit = _submit_dead_letters(status)
    stream = (status.get("events_stream") or {}).get("dead_letters")
    parts = [f"{submit} by catalog submit in table dead_letters"]
    if stream is not None:
        parts.insert(0, f"{stream} by catalog ingest in its dead-letter stream")
    shown = "unknown (broker unreachable)" if total is None else str(total)
    return f"{'dead-lettered events':28} {shown}  (invalid events set aside, never applied: {', '.join(parts)})"


def _render_workers(workers: dict[str, Any] | None) -> list[str]:
    if workers is None:
        return [f"{'workers':28} unknown (no remote control on the filesystem broker, or broker unreachable)"]
    if not workers:
        return [f"{'workers':28} none answered"]
    lines = [f"{'workers':28} {len(workers)} live"]
    for node, info in workers.items():
        lines.append(f"  {node:26} queues={','.join(info['queues'])} pool={info['pool']} "
                     f"concurrency={info['concurrency']}")
    return lines
