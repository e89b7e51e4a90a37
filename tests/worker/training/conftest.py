"""A labelled catalogue for the retrain tests, on its own database (SQLite file or a fresh
migrated Postgres database), so the label counts are exactly the ones seeded here.

Synthetic embeddings: each shop category is a cluster around a random unit direction in the
1280-d embedding space, with noise, L2-normalised like the tagging step's. The zero-shot map's
tag is right for only some images of each category (the taxonomy lacks the shop's own
categories), so a head trained on the reviewed labels has something to beat.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_lib

from db.migrate import upgrade
from db.session import dispose_engines
from tests.support.procs import Proc, catalog_env
from tests.support.services import PG_URL_BASE, REDIS_URL, create_pg_database, drop_pg_database
from worker.config import Settings


@pytest.fixture(params=["sqlite", "postgres"])
def train_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'train.db'}"
        upgrade(url)
        yield url
        dispose_engines()
        return
    name = create_pg_database("train_test")
    url = f"{PG_URL_BASE}/{name}"
    upgrade(url)
    yield url
    dispose_engines()
    drop_pg_database(name)


@pytest.fixture
def settings_for(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    def _make(url: str, **overrides: object) -> Settings:
        return make_settings(database_url=url, **overrides)

    return _make


RELOAD_REDIS_URL = REDIS_URL.rsplit("/", 1)[0] + "/14"  # its own database: flushed around the test


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[dict]:
    """A fresh Postgres database, its own Redis database and the environment of `catalog`
    processes analysing with the tagging step (the tests start the processes they need)."""
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
