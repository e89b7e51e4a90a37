"""Fixtures of the visual-search index tests: the same tests on both backends.

``search`` is parametrised over ``pgvector`` (a Postgres with pgvector and its HNSW indexes,
chosen by ``tests/support/pgvector.py``: normally the tests' own PostgreSQL 15, into which
``scripts/system-deps`` installs pgvector), ``embedded-sqlite`` (the embedded default) and
``embedded-postgres`` (a Postgres database without pgvector: ``auto`` must choose the embedded
index there; where the tests' server has the extension, a database of its own from which
``DROP EXTENSION vector CASCADE`` took the column and the HNSW indexes again). Each test works
in one transaction that is rolled back; the embedded index files live in the test's own directory.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from db import models as m
from db.migrate import upgrade
from db.session import session_factory
from tests.support import pgvector as pgv
from tests.support.services import create_pg_database, drop_pg_database
from worker.config import Settings
from worker.search.embedded import EmbeddedIndex
from worker.search.index import VectorIndex, open_index
from worker.search.vectors import pgvector_column

DIM = 1280
VERSION = "efficientnet-lite0-imagenet@test"


@pytest.fixture(scope="session")
def pgvector_db() -> Iterator[str]:
    """A migrated database on the pgvector server, shared by the session's tests."""
    name = pgv.create_database("catalog_search")
    url = pgv.url(name)
    upgrade(url)
    if not pgv.hnsw_usable():
        # pgserver's HNSW code needs AVX-512: test the backend's SQL on exact scans instead
        with session_factory(url)() as s, s.begin():
            s.execute(text("DROP INDEX ix_search_vectors_hnsw_full, ix_search_vectors_hnsw_region"))
    yield url
    pgv.drop_database(name)


@pytest.fixture(scope="session")
def pg_without_pgvector(pg_url: str) -> Iterator[str]:
    """A migrated Postgres database without the pgvector column: the tests' own one where the
    server has no pgvector, else a database of its own with the extension dropped again (what
    a Postgres without pgvector looks like to the search code: no ``search_vectors.embedding``)."""
    with session_factory(pg_url)() as session:
        if not pgvector_column(session, fresh=True):
            yield pg_url
            return
    name = create_pg_database("catalog_nopgvector")
    url = pg_url.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    with session_factory(url)() as s, s.begin():
        s.execute(text("DROP EXTENSION vector CASCADE"))
    yield url
    drop_pg_database(name)


@pytest.fixture(params=["pgvector", "embedded-sqlite", "embedded-postgres"])
def backend_db(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> tuple[str, str]:
    if request.param == "pgvector":
        return "pgvector", request.getfixturevalue("pgvector_db")
    if request.param == "embedded-sqlite":
        path = tmp_path / "catalog.db"
        shutil.copy(sqlite_template, path)
        return "embedded", f"sqlite:///{path}"
    return "embedded", request.getfixturevalue("pg_without_pgvector")


@dataclass
class SearchEnv:
    session: Session
    settings: Settings
    index: VectorIndex
    backend: str
    rng: np.random.Generator

    def vector(self, near: np.ndarray | None = None, noise: float = 0.1) -> np.ndarray:
        """A random unit vector, or one close to ``near`` (cosine about 1 / sqrt(1 + noise^2))."""
        fresh = self.rng.standard_normal(DIM).astype(np.float32)
        fresh /= np.linalg.norm(fresh)
        vec = fresh if near is None else near + noise * fresh
        return (vec / np.linalg.norm(vec)).astype(np.float32)

    def add(self, vec: np.ndarray, *, seller: str = "s1", status: str = "done", image_status: str = "done",
            category: str | None = None, tags: tuple[tuple[str, str], ...] = (), labels: tuple[str, ...] = (),
            sha256: str | None = None, phash: int | None = None, dhash: int | None = None,
            region: np.ndarray | None = None, listing: m.Listing | None = None) -> tuple[m.Listing, m.Image]:
        s = self.session
        if listing is None:
            listing = m.Listing(external_id=f"L-{uuid.uuid4().hex[:10]}", seller_id=seller, title="t",
                                category=category, status=status)
            s.add(listing)
            s.flush()
        image = m.Image(listing_id=listing.id, url=f"https://shop.example/{uuid.uuid4().hex}.jpg",
                        status=image_status, sha256=sha256, phash=phash, dhash=dhash)
        s.add(image)
        s.flush()
        for name, source in tags:
            s.add(m.Tag(listing_id=listing.id, image_id=image.id, name=name, score=0.9, source=source,
                        model_version="t"))
        for label in labels:
            s.add(m.Detection(image_id=image.id, label=label, score=0.9, x0=0, y0=0, x1=5, y1=5, model_version="t"))
        s.flush()
        self.index.upsert(s, image.id, listing.id,
                          {"full": (vec, VERSION), "region": (vec if region is None else region, VERSION)})
        s.flush()
        return listing, image


@pytest.fixture
def search(backend_db: tuple[str, str], make_settings: Callable[..., Settings]) -> Iterator[SearchEnv]:
    backend, url = backend_db
    settings = make_settings(search_embedding="full")
    with session_factory(url)() as session:
        session.begin()
        try:
            if backend == "embedded" and pgvector_column(session, fresh=True):
                pytest.skip("this Postgres database has pgvector: the embedded-on-Postgres case needs one without")
            index = open_index(settings, session)
            assert index.backend == backend
            yield SearchEnv(session, settings, index, backend, np.random.default_rng(7))
        finally:
            session.rollback()
            EmbeddedIndex.forget_instances()


def ids(results: list[Any]) -> list[int]:
    return [r.listing_id for r in results]
