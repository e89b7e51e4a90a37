"""Issue 9, acceptance 1 and 4 with a real `catalog worker` (Celery, Redis broker, Postgres):
a head promoted with `catalog models promote` is used for the next listing without a restart,
and `catalog models rollback` puts the zero-shot map back for the one after.

The head promoted here is a fixed one (it always says "space posters", a category the
taxonomy lacks), so the switch is unmistakable; training it is test_retrain's job."""

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
import torch

from db.migrate import upgrade
from db.session import dispose_engines, transaction
from tests.support.images import write_photo
from tests.support.procs import Proc, catalog_env, run_catalog, wait_for
from tests.support.services import PG_URL_BASE, REDIS_URL, create_pg_database, drop_pg_database
from worker.config import load_settings
from worker.training import registry
from worker.training.category import save_head

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]
RELOAD_REDIS_URL = REDIS_URL.rsplit("/", 1)[0] + "/14"  # its own database: flushed around the test


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[dict]:
    name = create_pg_database("catalog_reload")
    url = f"{PG_URL_BASE}/{name}"
    upgrade(url)
    client = redis_lib.Redis.from_url(RELOAD_REDIS_URL)
    client.flushdb()
    photos = tmp_path / "photos"
    photos.mkdir()
    data = tmp_path / "data"
    env = catalog_env(database_url=url, broker_url=RELOAD_REDIS_URL, data_dir=str(data),
                      fetch_allow_dirs=str(photos), events_stream="reload:events", dead_letter_stream="reload:dead",
                      steps="tagging", fetch_retries="0", task_time_limit="120")
    procs: list[Proc] = []
    yield {"env": env, "url": url, "redis": client, "photos": photos, "data": data, "tmp": tmp_path,
           "dsn": f"host=127.0.0.1 port=5432 user=postgres dbname={name}", "procs": procs}
    for proc in procs:
        proc.stop()
    client.flushdb()
    client.close()
    dispose_engines()
    drop_pg_database(name)


def _sql(dsn: str, query: str, *params: object) -> list[tuple]:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall()
    finally:
        conn.close()


def _submit(d: dict, external_id: str, photo: Path) -> None:
    d["redis"].xadd("reload:events", {"event": json.dumps({
        "event_id": str(uuid.uuid4()), "type": "listing.created", "occurred_at": datetime.now(UTC).isoformat(),
        "listing": {"id": external_id, "seller_id": "s1", "title": "t", "category": None, "images": [str(photo)]},
    })})


def _category(d: dict, external_id: str) -> tuple[str, str, str] | None:
    rows = _sql(d["dsn"], """SELECT t.name, t.source, t.model_version FROM tags t JOIN listings l
                             ON l.id = t.listing_id WHERE l.external_id = %s
                             AND t.source IN ('category-map', 'category-head') ORDER BY t.score DESC""",
                external_id)
    done = _sql(d["dsn"], "SELECT status FROM listings WHERE external_id = %s", external_id)
    return rows[0] if done and done[0][0] == "done" and rows else None


def test_running_worker_switches_head_on_promote_and_rollback(deployment: dict) -> None:
    d = deployment
    photos = [write_photo(d["photos"] / f"p{i}.jpg", size=(400, 300), seed=i) for i in range(3)]
    procs = [Proc(["worker", "--concurrency", "1"], d["env"], d["tmp"] / "worker.log"),
             Proc(["ingest"], d["env"], d["tmp"] / "ingest.log")]
    d["procs"].extend(procs)

    _submit(d, "L1", photos[0])
    first = wait_for(partial(_category, d, "L1"), 180, "L1 analysed", procs)
    assert first[1] == "category-map" and "category-head" not in first[2]  # type: ignore[index]

    # An operator promotes a head while the worker keeps running.
    settings = load_settings(database_url=d["url"], data_dir=d["data"])
    linear = torch.nn.Linear(1280, 2)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.tensor([5.0, 0.0]))
    path = save_head(linear, ["space posters", "other"], registry.model_dir(settings, "category-head") / "v" / "h.pt")
    with transaction(d["url"]) as s:
        version = registry.register(s, registry.CATEGORY_HEAD, path, {}, None).version
    promoted = run_catalog(["models", "promote", f"category-head@{version}"], d["env"])
    assert promoted.returncode == 0, promoted.stderr

    _submit(d, "L2", photos[1])
    second = wait_for(partial(_category, d, "L2"), 120, "L2 analysed", procs)
    assert second[:2] == ("space posters", "category-head")  # type: ignore[index]
    assert second[2].endswith(f"+category-head@{version}")  # type: ignore[index]

    rolled = run_catalog(["models", "rollback", "category-head"], d["env"])
    assert rolled.returncode == 0, rolled.stderr
    _submit(d, "L3", photos[2])
    third = wait_for(partial(_category, d, "L3"), 120, "L3 analysed", procs)
    assert third[1] == "category-map" and third[0] != "space posters"  # type: ignore[index]
    assert all(p.popen.poll() is None for p in procs)  # never restarted
