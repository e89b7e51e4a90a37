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

from db.migrate import upgrade
from db.session import dispose_engines
from worker.config import Settings


@pytest.fixture(params=["sqlite", "postgres"])
def train_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'train.db'}"
        upgrade(url)
        yield url
        dispose_engines()
        return
    from tests.support.services import PG_URL_BASE, create_pg_database, drop_pg_database

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




