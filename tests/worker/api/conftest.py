"""Fixtures of the review-service tests: a service on the real Postgres test database, users
with tokens, a login session, and the service served by uvicorn on a free port."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from db.session import transaction
from tests.support.api import PASSWORD, User, login
from worker.api import auth
from worker.api.app import create_app
from worker.config import Settings


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    path = tmp_path / "photos"
    path.mkdir()
    return path


@pytest.fixture
def api_settings(pg_url: str, make_settings: Callable[..., Settings], photo_dir: Path) -> Settings:
    return make_settings(database_url=pg_url, fetch_allow_dirs=[str(photo_dir)])


@pytest.fixture
def app(api_settings: Settings) -> FastAPI:
    return create_app(api_settings, secret=b"test-secret-" * 3)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


@pytest.fixture
def make_user(pg_url: str) -> Callable[..., User]:
    def _make(role: str = "reviewer", password: str | None = PASSWORD) -> User:
        name = f"{role}-{uuid.uuid4().hex[:8]}"
        with transaction(pg_url) as session:
            auth.create_user(session, name, role, password)
            token = auth.issue_token(session, name)
        return User(name, role, token)

    return _make


@pytest.fixture
def reviewer(make_user: Callable[..., User]) -> User:
    return make_user("reviewer")


@pytest.fixture
def admin(make_user: Callable[..., User]) -> User:
    return make_user("admin")




@pytest.fixture
def served(app: FastAPI) -> Iterator[str]:
    """The app served by a real uvicorn on 127.0.0.1 (many concurrent clients, a browser)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def log_in() -> Callable[..., str]:
    return login


@pytest.fixture(autouse=True)
def _remove_what_the_test_added(pg_url: str) -> Iterator[None]:
    """The Postgres database is shared by the whole test session: listings (with their images
    and flags) made by a test here must not reach another test's 'claim the next flag'."""
    from sqlalchemy import delete, func, select

    from db import models as m

    with transaction(pg_url) as session:
        last_listing = session.execute(select(func.max(m.Listing.id))).scalar() or 0
        last_flag = session.execute(select(func.max(m.Flag.id))).scalar() or 0
    yield
    with transaction(pg_url) as session:
        session.execute(delete(m.Flag).where(m.Flag.id > last_flag))
        session.execute(delete(m.Listing).where(m.Listing.id > last_listing))
