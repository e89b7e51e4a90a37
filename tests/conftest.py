"""Test fixtures: a real Postgres database per test session (migrated once, one outer
transaction rolled back per test), SQLite files copied from a migrated template, and a real
Redis database reserved for the tests."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
import redis as redis_lib
from sqlalchemy.orm import Session

from db.migrate import upgrade
from db.session import dispose_engines, get_engine
from worker.config import Settings, load_settings, reset_settings

PG_ADMIN_DSN = os.environ.get("CATALOG_TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
PG_URL_BASE = os.environ.get("CATALOG_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("CATALOG_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")


def _admin(sql: str) -> None:
    conn = psycopg2.connect(PG_ADMIN_DSN)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@pytest.fixture(autouse=True)
def _clean_settings_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in list(os.environ):
        if key.startswith("CATALOG_") and not key.startswith("CATALOG_TEST_") and key != "CATALOG_VENV":
            monkeypatch.delenv(key)
    reset_settings()
    yield
    reset_settings()


def create_pg_database(prefix: str = "catalog_test") -> str:
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    _admin(f'CREATE DATABASE "{name}"')
    return name


def drop_pg_database(name: str) -> None:
    dispose_engines()
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A migrated Postgres database for this test session."""
    name = create_pg_database()
    url = f"{PG_URL_BASE}/{name}"
    upgrade(url)
    yield url
    drop_pg_database(name)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    upgrade(f"sqlite:///{path}")
    dispose_engines()
    return path


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> Iterator[str]:
    """Both supported databases. Postgres tests share one migrated database and must clean
    up after themselves through the `session`-level rollback or unique ids."""
    if request.param == "sqlite":
        path = tmp_path / "catalog.db"
        shutil.copy(sqlite_template, path)
        yield f"sqlite:///{path}"
    else:
        yield request.getfixturevalue("pg_url")


@pytest.fixture
def pg_session(pg_url: str) -> Iterator[Session]:
    """A session inside an outer transaction that is rolled back after the test, whatever the
    code under test commits (commits become savepoint releases)."""
    engine = get_engine(pg_url)
    conn = engine.connect()
    outer = conn.begin()
    session = Session(bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()
        outer.rollback()
        conn.close()


@pytest.fixture
def make_settings(tmp_path: Path):  # noqa: ANN201
    def _make(**overrides: object) -> Settings:
        values: dict[str, object] = {"data_dir": tmp_path / "data", "steps": ["metadata"]}
        values.update(overrides)
        return load_settings(**values)

    return _make


@pytest.fixture
def redis_client() -> Iterator[redis_lib.Redis]:
    client = redis_lib.Redis.from_url(REDIS_URL)
    client.ping()
    yield client
    client.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
