"""Acceptance for issue 13, item 8: a listing processed end to end by real `catalog ingest`,
`catalog worker` and `catalog beat` processes on Redis and Postgres is announced on the results
stream as `listing.processed` (read here with plain redis-py, validated against the published
docs/results.schema.json) and POSTed, signed, to a webhook; a duplicated event or image message
announces nothing new; a reviewer's verdict announces the listing again with reason `rescored`."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from celery import Celery
from jsonschema import Draft202012Validator, FormatChecker  # type: ignore[import-untyped]
from sqlalchemy import select

from db import models as m
from db.migrate import upgrade
from db.session import dispose_engines, transaction
from tests.support.pipeline import photo
from tests.support.procs import Proc, catalog_env, wait_for
from tests.support.services import PG_URL_BASE, REDIS_URL, create_pg_database, drop_pg_database
from tests.support.webhook import WebhookReceiver
from worker.celery_app import ANALYZE_IMAGE_TASK
from worker.config import load_settings

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[2]
# Its own Redis database, flushed around the test (never the shared test database's keys).
RESULTS_E2E_REDIS_URL = REDIS_URL.rsplit("/", 1)[0] + "/12"
SECRET = "e2e-webhook-secret-" + "y" * 16
RESULTS = "res:results"


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[dict]:
    name = create_pg_database("catalog_results")
    url = f"{PG_URL_BASE}/{name}"
    upgrade(url)
    client = redis_lib.Redis.from_url(RESULTS_E2E_REDIS_URL)
    client.flushdb()
    photos = tmp_path / "photos"
    photos.mkdir()
    receiver = WebhookReceiver().__enter__()
    values = {"database_url": url, "broker_url": RESULTS_E2E_REDIS_URL, "data_dir": str(tmp_path / "data"),
              "fetch_allow_dirs": str(photos), "fetch_allow_hosts": receiver.allow_entry,
              "events_stream": "res:events", "dead_letter_stream": "res:dead", "results_stream": RESULTS,
              "steps": "metadata,quality", "fetch_retries": "0", "webhook_url": receiver.url(),
              "webhook_secret": SECRET, "visibility_timeout": "60", "task_time_limit": "30"}
    procs: list[Proc] = []
    yield {"env": catalog_env(**values), "settings": load_settings(**values), "url": url, "redis": client,
           "photos": photos, "receiver": receiver, "procs": procs, "tmp": tmp_path}
    for proc in procs:
        proc.stop()
    receiver.__exit__()
    client.flushdb()
    client.close()
    dispose_engines()
    drop_pg_database(name)


def start(d: dict, name: str, *args: str) -> Proc:
    proc = Proc(list(args), d["env"], d["tmp"] / f"{name}.log")
    d["procs"].append(proc)
    return proc


def listing_event(listing: str, images: list[str], event_id: str | None = None) -> str:
    return json.dumps({"event_id": event_id or str(uuid.uuid4()), "type": "listing.created",
                       "occurred_at": datetime.now(UTC).isoformat(),
                       "listing": {"id": listing, "seller_id": "seller-9", "title": "a mug", "category": None,
                                   "images": images}})


def announced(client: redis_lib.Redis, listing: str) -> list[dict]:
    """The listing's events on the results stream, as a consumer reads them (XRANGE)."""
    out: list[dict] = []
    entries: Any = client.xrange(RESULTS)
    for _entry_id, fields in entries:
        body = json.loads(fields[b"event"])
        assert fields[b"event_id"].decode() == body["event_id"] and fields[b"type"] == b"listing.processed"
        if body["listing"]["id"] == listing:
            out.append(body)
    return out


def test_listing_processed_on_the_results_stream_and_the_webhook(deployment: dict) -> None:
    d, r, receiver = deployment, deployment["redis"], deployment["receiver"]
    schema = json.loads((ROOT / "docs" / "results.schema.json").read_text())
    validator = Draft202012Validator(schema, format_checker=FormatChecker())
    good = photo(d["photos"] / "mug.png")  # 64x48: a low_quality flag for the reviewer
    first = listing_event("L-mug", [good, str(d["photos"] / "gone.png")])
    r.xadd("res:events", {"event": first})
    procs = [start(d, "worker", "worker", "--concurrency", "1"), start(d, "ingest", "ingest"),
             start(d, "beat", "beat")]

    found: Any = wait_for(lambda: announced(r, "L-mug"), 120, "listing.processed on the results stream", procs)
    (event,) = found
    validator.validate(event)
    assert event["reason"] == "processed" and event["type"] == "listing.processed"
    assert event["listing"]["seller_id"] == "seller-9" and event["source_event_id"] == json.loads(first)["event_id"]
    assert [(i["status"], i["failure_code"]) for i in event["images"]] == [("done", None), ("failed", "not_found")]
    assert event["decision"] != "ok" and [f["kind"] for f in event["flags"]] == ["low_quality"]
    assert set(event["model_versions"]) == {"metadata", "quality"}

    # the webhook got the same bytes, signed
    wait_for(lambda: receiver.received, 60, "the webhook POST", procs)
    post = receiver.received[0]
    assert json.loads(post.body) == event and post.headers["X-Catalog-Event-Id"] == event["event_id"]
    digest = "sha256=" + hmac.new(SECRET.encode(), post.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(post.headers["X-Catalog-Signature"], digest)

    # Duplicates: the same event again and a second message for the finished image. Another
    # listing sent after them (one worker process, FIFO queues) is the barrier: once it is
    # announced, the duplicates were handled.
    with transaction(d["url"]) as session:
        image_id = session.scalar(select(m.Image.id).where(m.Image.url == good))
    r.xadd("res:events", {"event": first})
    broker = Celery(broker=RESULTS_E2E_REDIS_URL)
    broker.send_task(ANALYZE_IMAGE_TASK, args=[image_id], queue="gpu")
    broker.close()
    r.xadd("res:events", {"event": listing_event("L-barrier", [photo(d["photos"] / "other.png", (9, 9, 9))])})
    wait_for(lambda: announced(r, "L-barrier"), 120, "the barrier listing announced", procs)
    assert len(announced(r, "L-mug")) == 1

    # A reviewer dismisses the flag (the review service and the CLI call this): the listing is
    # announced again, published by the beat's relay sweep.
    from worker.review import queue

    flag_id = event["flags"][0]["id"]
    with transaction(d["url"]) as session:
        queue.claim_flag(session, flag_id, "rita")
    with transaction(d["url"]) as session:
        queue.resolve_flag(session, flag_id, "rita", "dismissed", settings=d["settings"])
    events = wait_for(lambda: (found := announced(r, "L-mug")) and len(found) == 2 and found, 60,
                      "listing.processed (rescored)", procs)
    assert isinstance(events, list)
    rescored = events[1]
    validator.validate(rescored)
    assert rescored["reason"] == "rescored" and rescored["event_id"] != event["event_id"]
    assert [f["status"] for f in rescored["flags"]] == ["dismissed"]
    assert rescored["decision"] == "incomplete"  # nothing found now, but one photo was never looked at
    wait_for(lambda: len([p for p in receiver.received if json.loads(p.body)["listing"]["id"] == "L-mug"]) == 2,
             60, "the rescored webhook POST", procs)
