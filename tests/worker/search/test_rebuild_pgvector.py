"""`catalog search-index rebuild` on a real Postgres with pgvector installed after migration
0007 ran (the operator's path in docs/search.md): it creates the extension, the halfvec column
and both HNSW indexes, fills them from the images analysed before, and the backend switches
to pgvector; a deleted listing's embedding is not indexed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import text

from db import models as m
from db.migrate import upgrade
from db.session import session_factory
from tests.support import pgvector as pgv
from worker.config import load_settings, reset_settings
from worker.search.common import IndexFilters
from worker.search.pgvector import PgVectorIndex
from worker.search.vectors import encode

VERSION = "efficientnet-lite0-imagenet@ab+category-head@cd"


@pytest.fixture
def pg_before_pgvector() -> Iterator[str]:
    """A migrated database on a server with pgvector available, as if it had been installed
    only after 0007 ran: the extension (and with it the column and the indexes) dropped."""
    name = pgv.create_database("catalog_rebuild", need_hnsw=True, extension=False)
    url = pgv.url(name)
    upgrade(url)
    with session_factory(url)() as s, s.begin():
        s.execute(text("DROP EXTENSION IF EXISTS vector CASCADE"))
    yield url
    pgv.drop_database(name)


def test_rebuild_creates_the_hnsw_indexes_and_switches_auto_to_pgvector(
        pg_before_pgvector: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = pg_before_pgvector
    vec = np.linspace(-1, 1, 1280).astype(np.float32)
    vec /= np.linalg.norm(vec)
    with session_factory(url)() as s, s.begin():
        live = m.Listing(external_id="live", seller_id="s", title="t", status="done")
        gone = m.Listing(external_id="gone", seller_id="s", title="t", status="deleted")
        s.add_all([live, gone])
        s.flush()
        for lst in (live, gone):
            img = m.Image(listing_id=lst.id, url="https://x.example/a.jpg", status="done")
            s.add(img)
            s.flush()
            s.add(m.Embedding(image_id=img.id, model_version=VERSION, dim=1280, vector=encode(vec)))
        live_id = live.id
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CATALOG_DATABASE_URL", url)
    reset_settings()
    from worker.cli.main import main

    runner = CliRunner()
    before = runner.invoke(main, ["search-index", "status", "--json"])
    assert before.exit_code in (0, 1) and '"backend": "embedded"' in before.output, before.output
    rebuilt = runner.invoke(main, ["search-index", "rebuild"])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "pgvector index rebuilt: 2 vectors (full 1, region 1)" in rebuilt.output
    after = runner.invoke(main, ["search-index", "status", "--json"])
    assert after.exit_code == 0 and '"backend": "pgvector"' in after.output, after.output
    with session_factory(url)() as s, s.begin():
        indexes = set(s.execute(text(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'search_vectors' "
            "AND indexdef ILIKE '%USING hnsw%'")).scalars())
        assert indexes == {"ix_search_vectors_hnsw_full", "ix_search_vectors_hnsw_region"}
        hits = PgVectorIndex(load_settings()).query(s, vec, 5, IndexFilters(kind="region"))
    assert [h.listing_id for h in hits] == [live_id]
    assert hits[0].score == pytest.approx(1.0, abs=1e-3)
