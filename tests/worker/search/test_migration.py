"""Migration 0007 on Postgres with pgvector: the halfvec column and the per-kind HNSW indexes are
created, existing tagging embeddings are copied into it, the models still match, and it goes
down and up again. (SQLite and Postgres without pgvector: tests/db/test_migrations.py and
test_pipeline.py's copy test.)"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pgvector.sqlalchemy  # noqa: F401  (teaches SQLAlchemy's reflection the halfvec type)
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from db.migrate import current_revision, downgrade, head_revision, upgrade
from db.models import Base
from db.session import get_engine, session_factory
from tests.support import pgvector as pgv
from worker.search.vectors import encode


@pytest.fixture
def pgvector_fresh() -> Iterator[str]:
    name = pgv.create_database("catalog_migrate", need_hnsw=True, extension=False)  # 0007 creates it
    yield pgv.url(name)
    pgv.drop_database(name)


def _pgvector_objects(diff: list[object]) -> bool:
    text_ = repr(diff)
    return "embedding" in text_ or "hnsw" in text_


def test_0007_on_pgvector_adds_the_column_indexes_and_copies_embeddings(pgvector_fresh: str) -> None:
    url = pgvector_fresh
    upgrade(url, "0006_outbox")
    vec = np.linspace(-1, 1, 1280).astype(np.float32)
    vec /= np.linalg.norm(vec)
    with session_factory(url)() as s, s.begin():
        s.execute(text("INSERT INTO listings (id, external_id, seller_id, title, status, created_at, updated_at) "
                       "VALUES (1, 'a', 's', 't', 'done', now(), now())"))
        s.execute(text("INSERT INTO images (id, listing_id, position, url, status, attempts, created_at, updated_at) "
                       "VALUES (1, 1, 0, 'u', 'done', 1, now(), now())"))
        s.execute(text("INSERT INTO embeddings (image_id, model_version, dim, vector) VALUES (1, 'v', 1280, :v)"),
                  {"v": encode(vec)})
    upgrade(url)
    assert current_revision(url) == head_revision(url)
    with session_factory(url)() as s:
        assert s.execute(text("SELECT count(*) FROM search_vectors WHERE embedding IS NOT NULL")).scalar() == 1
        indexes = set(s.execute(text("SELECT indexname FROM pg_indexes WHERE tablename = 'search_vectors'")).scalars())
        assert {"ix_search_vectors_hnsw_full", "ix_search_vectors_hnsw_region"} <= indexes
        stored = s.execute(text("SELECT embedding::text FROM search_vectors")).scalar_one()
        assert np.allclose(np.array(stored.strip("[]").split(","), dtype=np.float32), vec, atol=1e-3)
    with get_engine(url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert all(_pgvector_objects([d]) for d in diff), diff  # only what the models cannot declare
    downgrade(url, "0006_outbox")
    upgrade(url)
    assert current_revision(url) == head_revision(url)
