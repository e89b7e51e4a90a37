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
    with get_engine(db_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


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
