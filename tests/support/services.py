"""The test servers and what tests create on them: the Postgres and Redis the tests use,
throwaway databases (dropped at the end of the session, also those a killed run left), and
unique names whose Redis keys are deleted after each test. The fixtures in tests/conftest.py
build on these."""

from __future__ import annotations

import os
import re
import uuid
from typing import Any

import psycopg2
import redis as redis_lib

from db.session import dispose_engines

PG_ADMIN_DSN = os.environ.get("CATALOG_TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")


PG_URL_BASE = os.environ.get("CATALOG_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432")


REDIS_URL = os.environ.get("CATALOG_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")


#: Databases this process created and has not dropped yet.
_created_databases: set[str] = set()


# "<prefix>_pytest<pid>_<6 hex>": the pid lets a later run drop what a killed run left behind.
_TEST_DATABASE = re.compile(r"^[a-z0-9_]+_pytest(\d+)_[0-9a-f]{6}$")


def _admin(sql: str, *params: object) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(PG_ADMIN_DSN)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params or None)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def create_pg_database(prefix: str = "catalog_test") -> str:
    """Create an empty database; ``drop_pg_database`` (or the end of the session) removes it."""
    name = f"{prefix}_pytest{os.getpid()}_{uuid.uuid4().hex[:6]}"
    _admin(f'CREATE DATABASE "{name}"')
    _created_databases.add(name)
    return name


def drop_pg_database(name: str) -> None:
    dispose_engines()
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _created_databases.discard(name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _drop_orphaned_databases() -> None:
    """Drop test databases whose creating process is gone (a run killed before its teardown);
    those of concurrent live runs are left alone."""
    for (name,) in _admin("SELECT datname FROM pg_database"):
        match = _TEST_DATABASE.match(name)
        if match and not _pid_alive(int(match.group(1))):
            _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


#: Commands that can create a key, by their first word (redis-py sends "XGROUP CREATE" as one).
_KEY_WRITES = frozenset({
    "APPEND", "HINCRBY", "HSET", "HSETNX", "INCR", "INCRBY", "LPUSH", "RPUSH", "SADD", "SET",
    "SETEX", "SETNX", "XADD", "XGROUP", "ZADD", "PFADD", "EXPIRE",
})


#: Names handed out by ``unique()`` during the current test (streams and other keys among them).
_unique_names: set[str] = set()


class TrackingRedis(redis_lib.Redis):
    """A client that remembers every key it may have created, so the fixture can delete them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.written: set[str] = set()

    def execute_command(self, *args: Any, **options: Any) -> Any:
        if len(args) > 1 and str(args[0]).split()[0].upper() in _KEY_WRITES:
            key = args[1]
            self.written.add(key.decode() if isinstance(key, bytes) else str(key))
        return super().execute_command(*args, **options)


def unique(prefix: str) -> str:
    """A name no other test (or concurrent run) uses; Redis keys of that name are cleaned up."""
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    _unique_names.add(name)
    return name
