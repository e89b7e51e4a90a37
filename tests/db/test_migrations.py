"""Migrations are the only way the schema changes: they must match the models, run on both
databases, and be idempotent and reversible."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from db.migrate import current_revision, downgrade, head_revision, upgrade
from db.models import Base
from db.session import get_engine


def test_models_match_migrations(db_url: str) -> None:
    import pgvector.sqlalchemy  # noqa: F401  (teaches SQLAlchemy's reflection the halfvec type)

    with get_engine(db_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    # On a Postgres with pgvector, migration 0007 adds search_vectors.embedding and its HNSW
    # indexes, which the models cannot declare (tests/worker/search/test_migration.py checks them).
    assert [d for d in diff if "embedding" not in repr(d) and "hnsw" not in repr(d)] == []


def test_upgrade_is_idempotent_and_reversible(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    upgrade(url)
    assert current_revision(url) == head_revision(url)
    downgrade(url, "base")
    assert current_revision(url) is None
    upgrade(url)
    assert current_revision(url) == head_revision(url)


def test_postgres_downgrade_and_upgrade_again(fresh_pg_url: str) -> None:
    url = fresh_pg_url
    upgrade(url)
    upgrade(url)
    assert current_revision(url) == head_revision(url)
    downgrade(url, "base")
    assert current_revision(url) is None
    upgrade(url)
    assert current_revision(url) == head_revision(url)


def test_0004_ends_pending_images_of_deleted_listings(tmp_path: Path) -> None:
    """Earlier releases left them pending forever; the migration gives them the state a delete
    gives them now (issue 12, item 15), and leaves everything else alone."""
    from sqlalchemy import text

    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url, "0003_listing_fraud_score")
    with get_engine(url).begin() as conn:
        for listing_id, status in ((1, "deleted"), (2, "processing")):
            conn.execute(text("INSERT INTO listings (id, external_id, seller_id, title, status, created_at, "
                              "updated_at) VALUES (:id, :ext, 's', '', :status, '2026-01-01', '2026-01-01')"),
                         {"id": listing_id, "ext": f"L{listing_id}", "status": status})
        for image_id, listing_id, status in ((1, 1, "pending"), (2, 1, "done"), (3, 2, "pending")):
            conn.execute(text("INSERT INTO images (id, listing_id, position, url, status, attempts, created_at, "
                              "updated_at) VALUES (:id, :lid, 0, 'u', :status, 0, '2026-01-01', '2026-01-01')"),
                         {"id": image_id, "lid": listing_id, "status": status})
    upgrade(url)
    with get_engine(url).connect() as conn:
        rows = conn.execute(text("SELECT id, status, error, complete, lease_owner FROM images ORDER BY id")).all()
    assert rows[0][1:] == ("failed", "listing_deleted: the listing was deleted before this image was analysed",
                           0, None)
    assert [tuple(r[1:3]) for r in rows[1:]] == [("done", None), ("pending", None)]
