"""The production wiring, end to end: plain-redis producer -> `catalog ingest` -> Redis broker
-> `catalog worker` processes -> Postgres, checked with SQL."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import psycopg2
import pytest
import redis as redis_lib

from db.migrate import upgrade
from tests.support.http import LocalImageServer
from tests.support.images import (
    write_not_an_image,
    write_photo,
    write_png_bomb,
    write_truncated_jpeg,
)
from tests.support.procs import Proc, catalog_env, run_catalog, wait_for
from tests.support.services import PG_URL_BASE, REDIS_URL, create_pg_database, drop_pg_database

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


def event(listing: str, images: list[str], event_id: str | None = None, etype: str = "listing.created") -> str:
    return json.dumps({
        "event_id": event_id or str(uuid.uuid4()), "type": etype,
        "occurred_at": datetime.now(UTC).isoformat(),
        "listing": {"id": listing, "seller_id": "seller-1", "title": "a listing", "category": None,
                    "images": images},
    })


# Its own Redis database: the broker's queues and the stream are flushed around each test,
# which must never touch the keys of tests using the shared test database (REDIS_URL).
E2E_REDIS_URL = REDIS_URL.rsplit("/", 1)[0] + "/13"


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[dict]:
    """A fresh Postgres database, a flushed Redis database of its own, a local image server, and the
    environment a `catalog` process needs to use them."""
    name = create_pg_database("catalog_e2e")
    url = f"{PG_URL_BASE}/{name}"
    upgrade(url)
    client = redis_lib.Redis.from_url(E2E_REDIS_URL)
    client.flushdb()
    photos = tmp_path / "photos"
    photos.mkdir()
    server = LocalImageServer(photos).start()
    env = catalog_env(
        database_url=url, broker_url=E2E_REDIS_URL, data_dir=str(tmp_path / "data"),
        fetch_allow_hosts=server.allow_entry, fetch_allow_dirs=str(photos), events_stream="e2e:events",
        dead_letter_stream="e2e:dead", visibility_timeout="10", fetch_retries="0",
        ingest_claim_idle_ms="2000", restore_sweep_seconds="2", steps="metadata",
        task_time_limit="8",
    )
    dsn = f"host=127.0.0.1 port=5432 user=postgres dbname={name}"
    procs: list[Proc] = []
    yield {"env": env, "redis": client, "server": server, "photos": photos, "dsn": dsn,
           "procs": procs, "tmp": tmp_path}
    for proc in procs:
        proc.stop()
    server.stop()
    client.flushdb()
    client.close()
    drop_pg_database(name)


def sql(dsn: str, query: str, *params: object) -> list[tuple]:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall()
    finally:
        conn.close()


def _is_done(dsn: str, external_id: str) -> bool:
    return listing_status(dsn, external_id) == "done"


def listing_status(dsn: str, external_id: str) -> str | None:
    rows = sql(dsn, "SELECT status FROM listings WHERE external_id = %s", external_id)
    return rows[0][0] if rows else None


def start(d: dict, name: str, *args: str) -> Proc:
    proc = Proc(list(args), d["env"], d["tmp"] / f"{name}-{len(d['procs'])}.log")
    d["procs"].append(proc)
    return proc


def test_events_flow_to_postgres_with_duplicates_and_bad_input(deployment: dict) -> None:
    d, dsn, server = deployment, deployment["dsn"], deployment["server"]
    write_photo(d["photos"] / "front.jpg", size=(400, 300), seed=3)
    write_photo(d["photos"] / "back.png", size=(300, 300), seed=4)
    write_truncated_jpeg(d["photos"] / "truncated.jpg")
    write_not_an_image(d["photos"] / "fake.jpg")
    write_png_bomb(d["photos"] / "bomb.png", side=30000)
    r = d["redis"]

    # 1. the same event three times; 2. an invalid entry; 3. a listing with bad input; 4. one more good one
    dup = event("L-good", [server.url("/front.jpg"), server.url("/back.png")], event_id="evt-dup")
    for _ in range(3):
        r.xadd("e2e:events", {"event": dup})
    r.xadd("e2e:events", {"event": '{"type": "listing.created"}'})
    r.xadd("e2e:events", {"event": event("L-bad", [
        server.url("/front.jpg"), server.url("/truncated.jpg"), server.url("/fake.jpg"),
        server.url("/bomb.png"), "http://127.0.0.1:1/not-allow-listed.jpg",
        "file:///etc/passwd",  # outside CATALOG_FETCH_ALLOW_DIRS: refused, never read
    ])})
    r.xadd("e2e:events", {"event": event("L-after", [str(d["photos"] / "back.png")])})

    procs = [start(d, "worker", "worker", "--concurrency", "2"), start(d, "ingest", "ingest")]
    for ext in ("L-good", "L-bad", "L-after"):
        wait_for(partial(_is_done, dsn, ext), 120, f"{ext} done", procs)

    assert sql(dsn, "SELECT count(*) FROM listings WHERE external_id = 'L-good'") == [(1,)]
    assert sql(dsn, "SELECT count(*) FROM processed_events WHERE event_id = 'evt-dup'") == [(1,)]
    good = sql(dsn, """SELECT i.url, i.status, i.width, i.height, i.format, i.phash IS NOT NULL
                       FROM images i JOIN listings l ON l.id = i.listing_id
                       WHERE l.external_id = 'L-good' ORDER BY i.position""")
    assert good == [(server.url("/front.jpg"), "done", 400, 300, "JPEG", True),
                    (server.url("/back.png"), "done", 300, 300, "PNG", True)]
    assert sql(dsn, """SELECT count(*) FROM step_runs s JOIN images i ON i.id = s.image_id
                       JOIN listings l ON l.id = i.listing_id WHERE l.external_id = 'L-good'""") == [(2,)]

    bad = sql(dsn, """SELECT i.status, i.error FROM images i JOIN listings l ON l.id = i.listing_id
                      WHERE l.external_id = 'L-bad' ORDER BY i.position""")
    assert bad[0] == ("done", None)
    assert [row[0] for row in bad[1:]] == ["failed"] * 5
    assert bad[1][1].startswith("truncated:")
    assert bad[2][1].startswith("not_an_image:")
    assert bad[3][1].startswith("too_many_pixels:")
    assert bad[4][1].startswith("blocked_address:") and "127.0.0.1" in bad[4][1]
    assert bad[5][1].startswith("bad_reference:") and "CATALOG_FETCH_ALLOW_DIRS" in bad[5][1]
    assert "root:" not in bad[5][1]
    assert sql(dsn, "SELECT i.status FROM images i JOIN listings l ON l.id = i.listing_id "
                    "WHERE l.external_id = 'L-after'") == [("done",)]

    dead = r.xrange("e2e:dead")
    assert len(dead) == 1 and b"event_id" in dead[0][1][b"reason"]
    assert r.xpending("e2e:events", "catalog-ingest")["pending"] == 0

    status = run_catalog(["status", "--json"], d["env"])
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["listings"] == {"done": 3}
    assert report["failed_images_by_code"] == {"truncated": 1, "not_an_image": 1, "too_many_pixels": 1,
                                               "blocked_address": 1, "bad_reference": 1}
    assert report["broker"] == "redis" and report["events_stream"]["pending"] == 0
    assert report["events_stream"]["dead_letters"] == 1


def test_worker_killed_mid_task_is_redelivered_without_duplicates(deployment: dict) -> None:
    d, dsn, server = deployment, deployment["dsn"], deployment["server"]
    body = (write_photo(d["tmp"] / "slow.jpg", size=(320, 240), seed=5)).read_bytes()
    stall = server.stall("/slow.jpg", seconds=120, body=body, content_type="image/jpeg")
    d["redis"].xadd("e2e:events", {"event": event("L-kill", [server.url("/slow.jpg")])})

    ingest = start(d, "ingest", "ingest")
    worker = start(d, "worker", "worker", "--concurrency", "1")
    assert stall.arrived.wait(90), worker.output()[-3000:]  # the task is in the middle of its download
    worker.kill()  # SIGKILL to the whole worker (parent and pool child)
    stall.release()
    assert listing_status(dsn, "L-kill") == "processing"

    replacement = start(d, "worker2", "worker", "--concurrency", "1")
    wait_for(lambda: listing_status(dsn, "L-kill") == "done", 120, "redelivered task finished",
             [ingest, replacement])
    rows = sql(dsn, """SELECT i.status, i.attempts, i.width FROM images i JOIN listings l ON l.id = i.listing_id
                       WHERE l.external_id = 'L-kill'""")
    assert rows == [("done", 2, 320)]
    assert stall.hits == 2
    assert sql(dsn, "SELECT count(*) FROM step_runs") == [(1,)]
    assert sql(dsn, "SELECT count(*) FROM processed_events") == [(1,)]
