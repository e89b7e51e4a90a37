"""`catalog status` for operators (issue 13, items 1 and 7): images finished per minute, the
backlog's ETA, one dead-letter count (the old two keys kept), and a warning for every queue with
work that no live worker consumes. The live workers themselves are checked with real worker
processes in tests/e2e/test_cpu_routing.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import update

from db import models as m
from db.migrate import upgrade
from db.session import session_factory, transaction
from tests.support.pipeline import apply, event, photo
from tests.support.services import REDIS_URL, TrackingRedis, unique
from worker.cli.main import main
from worker.pipeline.events import record_dead_letter
from worker.reports.status import collect_status, database_status, render, unconsumed_queue_warnings


@pytest.fixture(params=["sqlite", "postgres"])
def own_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database of this test's own: status counts every row."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'status.db'}"
    else:
        url = request.getfixturevalue("fresh_pg_url")
    upgrade(url)
    yield url


def _finish(url: str, image_id: int, status: str, ago: timedelta) -> None:
    with session_factory(url)() as session, session.begin():
        session.execute(update(m.Image).where(m.Image.id == image_id)
                        .values(status=status, complete=status == "done", processed_at=m.utcnow() - ago,
                                error="truncated: cut" if status == "failed" else None))


def test_rates_over_1_5_15_minutes_and_backlog_eta(own_db: str, tmp_path: Path, make_settings) -> None:
    refs = [photo(tmp_path / f"{i}.png", (i * 30, 9, 9)) for i in range(8)]
    ids = apply(own_db, event("L-rates", refs)).images_to_analyze
    _finish(own_db, ids[0], "done", timedelta(seconds=20))    # in the 1, 5 and 15 min windows
    _finish(own_db, ids[1], "failed", timedelta(seconds=40))  # a failure finished too
    _finish(own_db, ids[2], "done", timedelta(minutes=3))     # 5 and 15
    _finish(own_db, ids[3], "done", timedelta(minutes=10))    # 15 only
    _finish(own_db, ids[4], "done", timedelta(hours=2))       # none
    settings = make_settings(database_url=own_db)

    status = database_status(settings)
    assert status["images_per_min"] == {"1m": 2.0, "5m": 0.6, "15m": 0.27}
    # 3 pending images at 0.6 per minute (the 5-minute rate): 5 minutes.
    assert status["backlog"] == {"pending_images": 3, "eta_s": 300, "eta": "5 min", "at_images_per_min": 0.6}
    text = render(collect_status(settings))
    assert "images finished per min      1m: 2, 5m: 0.6, 15m: 0.27" in text
    assert "3 pending image(s), ETA 5 min" in text


def test_eta_is_unknown_when_nothing_finished_lately(own_db: str, tmp_path: Path, make_settings) -> None:
    ids = apply(own_db, event("L-stuck", [photo(tmp_path / f"{i}.png", (i, 1, 1)) for i in range(2)])) \
        .images_to_analyze
    _finish(own_db, ids[0], "done", timedelta(minutes=7))  # only in the 15-minute window
    status = database_status(make_settings(database_url=own_db))
    assert status["images_per_min"]["5m"] == 0
    assert status["backlog"]["eta_s"] is None and status["backlog"]["eta"].startswith("unknown")


def test_one_dead_letter_count_on_the_embedded_broker(tmp_path: Path, make_settings, monkeypatch) -> None:
    """Embedded: only `catalog submit` dead-letters (into the table); the old key stays."""
    url = f"sqlite:///{tmp_path / 'dl.db'}"
    upgrade(url)
    with transaction(url) as session:
        record_dead_letter(session, "events.jsonl#1", "{", "not JSON")
        record_dead_letter(session, "events.jsonl#2", "{}", "no event_id")
    status = collect_status(make_settings(database_url=url))
    assert status["dead_lettered_events"] == 2
    assert status["dead_letters"] == 2  # deprecated key, same meaning as before
    assert status["workers"] is None and status["warnings"] == []
    text = render(status)
    assert [line for line in text.splitlines() if "dead" in line] == [
        "dead-lettered events         2  (invalid events set aside, never applied: 2 by catalog submit "
        "in table dead_letters)"]

    # A webhook delivery given up (worker/outbound) is a result, not a rejected event.
    with transaction(url) as session:
        session.add(m.OutboxEvent(event_id="e-1", type="listing.processed", payload={}, webhook_status="pending"))
        session.add(m.OutboxEvent(event_id="e-2", type="listing.processed", payload={},
                                  published_at=m.utcnow(), webhook_status="dead"))
        record_dead_letter(session, "webhook:e-2", "{}", "webhook gave up after 8 attempt(s): HTTP 500")
    status = collect_status(make_settings(database_url=url))
    assert status["dead_lettered_events"] == 2 and status["dead_letters"] == 3
    assert status["outbound"] == {"unpublished": 1, "webhook_pending": 1, "webhook_given_up": 1}
    assert "outbound                     unpublished=1, webhook_pending=1, webhook_given_up=1" in render(status)

    # The command prints valid JSON with the same numbers.
    for key, value in {"DATABASE_URL": url, "DATA_DIR": str(tmp_path / "data"), "STEPS": "metadata"}.items():
        monkeypatch.setenv(f"CATALOG_{key}", value)
    out = CliRunner().invoke(main, ["status", "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert report["dead_lettered_events"] == 2 and report["backlog"]["pending_images"] == 0


def test_one_dead_letter_count_adds_the_ingest_stream(fresh_pg_url: str, redis_client: TrackingRedis,
                                                     make_settings) -> None:
    """Redis: `catalog ingest` dead-letters into a stream, `catalog submit` into the table; the
    two never hold the same event, so the one count is their sum. Both old keys stay."""
    upgrade(fresh_pg_url)
    with transaction(fresh_pg_url) as session:
        record_dead_letter(session, "f#1", "{", "not JSON")
    stream, dead = unique("status-ev"), unique("status-dead")
    for i in range(3):
        redis_client.xadd(dead, {"code": "invalid", "reason": f"bad {i}", "payload": b"{}"})
    settings = make_settings(database_url=fresh_pg_url, broker_url=REDIS_URL, redis_url=REDIS_URL,
                             events_stream=stream, dead_letter_stream=dead)
    try:
        status = collect_status(settings, inspect_timeout=0.5)
    finally:  # kombu's expiry entry for Celery's remote-control reply queue
        redis_client.zrem("_kombu.binding_deadlines", "reply.celery.pidbox")
    assert status["dead_lettered_events"] == 4
    assert status["dead_letters"] == 1 and status["events_stream"]["dead_letters"] == 3  # deprecated keys
    text = render(status)
    assert "dead_letters=" not in text and "\ndead_letters " not in text
    assert ("dead-lettered events         4  (invalid events set aside, never applied: 3 by catalog ingest "
            "in its dead-letter stream, 1 by catalog submit in table dead_letters)") in text
    assert isinstance(status["workers"], dict)  # asked over remote control (who answers depends on the machine)


def test_warns_about_each_queue_with_work_and_no_consumer() -> None:
    workers = {"events@h": {"queues": ["ingest", "cpu"], "pool": "prefork", "concurrency": 2}}
    warnings = unconsumed_queue_warnings({"ingest": 5, "gpu": 3, "cpu": 0, "train": 1}, workers)
    assert len(warnings) == 2
    assert warnings[0].startswith("queue 'gpu' holds 3 message(s) and no live worker consumes it")
    assert "catalog worker -Q ingest,images,cpu" in warnings[0]
    assert warnings[1].startswith("queue 'train' holds 1 message(s)") and "-Q train" in warnings[1]
    assert unconsumed_queue_warnings({"gpu": 3}, {}) != []  # no worker at all
    status = {"warnings": warnings, "workers": workers}
    text = render(status)
    assert "events@h" in text and "queues=ingest,cpu pool=prefork concurrency=2" in text
    assert text.splitlines()[-2].startswith("WARNING: queue 'gpu'")


def test_broker_down_still_shows_the_database_side(tmp_path: Path, make_settings) -> None:
    url = f"sqlite:///{tmp_path / 'down.db'}"
    upgrade(url)
    status = collect_status(make_settings(database_url=url, broker_url="redis://127.0.0.1:1/0",
                                          redis_url="redis://127.0.0.1:1/0"))
    assert "broker_error" in status and status["workers"] is None
    assert status["dead_lettered_events"] is None  # the stream's part is unknown
    assert "dead-lettered events         unknown (broker unreachable)" in render(status)
    json.dumps(status)
