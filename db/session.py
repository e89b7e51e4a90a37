"""Engines and sessions.

Postgres runs at READ COMMITTED (the default, made explicit): the listing row lock taken
when an image finishes is what serialises "is this listing done?" decisions.
SQLite gets WAL, a busy timeout and foreign keys so that several local processes
(`catalog ingest`, `catalog worker`) can share one file.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

_lock = threading.Lock()
_engines: dict[str, tuple[int, Engine]] = {}


def _sqlite_pragmas(dbapi_conn: Any, _record: object) -> None:  # the DBAPI connect hook
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        url,
        isolation_level="READ COMMITTED",
        # A host that drops packets instead of refusing must not hang a connect forever.
        connect_args={"connect_timeout": 10},
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=5,
    )


def get_engine(url: str) -> Engine:
    """One engine per URL per process. After a fork (Celery prefork) the child builds its own
    instead of sharing the parent's pooled sockets."""
    pid = os.getpid()
    with _lock:
        cached = _engines.get(url)
        if cached is None or cached[0] != pid:
            _engines[url] = (pid, make_engine(url))
        return _engines[url][1]


def dispose_engines() -> None:
    with _lock:
        for pid, engine in _engines.values():
            if pid == os.getpid():
                engine.dispose()
        _engines.clear()


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextlib.contextmanager
def transaction(url: str) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    session = session_factory(url)()
    try:
        with session.begin():
            yield session
    finally:
        session.close()
