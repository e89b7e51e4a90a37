"""One vector index interface, two backends.

``open_index(settings, session_or_engine)`` returns the :class:`VectorIndex` that
``CATALOG_SEARCH_BACKEND`` selects:

* ``pgvector`` -- :class:`worker.search.pgvector.PgVectorIndex`: HNSW cosine indexes on the
  ``search_vectors.embedding`` halfvec column (Postgres with the ``vector`` extension);
* ``embedded`` -- :class:`worker.search.embedded.EmbeddedIndex`: usearch HNSW files under
  ``CATALOG_SEARCH_DIR`` (default ``<data_dir>/search``) that catch up with the database;
* ``auto`` (default) -- pgvector when the database has the column, else embedded;
* ``off`` -- :class:`SearchConfigError` here; queries answer ``SearchError("search_off")``.

The database table ``search_vectors`` (:mod:`worker.search.vectors`) is the truth for both:
vectors are written there in the transaction that stores an image's results and deleted with
its listing; the backends only make the nearest-neighbour step fast. Every hit is checked
against the database when it is returned (image ``done``, listing not ``deleted``, the row
still there, the filters), so neither backend ever returns a deleted or failed image, even
while an embedded index file is behind.

Operations (``session`` is a SQLAlchemy session; none of them commits but ``rebuild``):

* ``upsert(session, image_id, listing_id, vectors)`` -- store an image's vectors
  (``{"full": vec, "region": vec}``, with their model version) replacing the old ones;
* ``delete_image(session, image_id)`` / ``delete_listing(session, listing_id)``;
* ``query(session, vector, k, filters) -> list[Hit]`` -- at most ``k`` hits, best first,
  that pass ``filters`` (:class:`IndexFilters`); ``Hit.score`` is the cosine similarity;
* ``rebuild(session, progress=None) -> int`` -- rebuild from the stored vectors (and, for
  existing images without search vectors, from their tagging embeddings); commits;
* ``count(session, kind=None) -> int`` and ``health(session) -> dict`` (for ``status``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from worker.config import Settings
from worker.search.common import (
    CATEGORY_SOURCES,
    QUERY_STATUSES,
    Hit,
    IndexFilters,
    IndexHealth,
    filter_conditions,
    passing,
    search_dir,
)
from worker.search.embedded import EmbeddedIndex
from worker.search.errors import SearchConfigError
from worker.search.pgvector import PgVectorIndex
from worker.search.vectors import pgvector_column

__all__ = ["CATEGORY_SOURCES", "QUERY_STATUSES", "EmbeddedIndex", "Hit", "IndexFilters", "IndexHealth",
           "PgVectorIndex", "VectorIndex", "filter_conditions", "open_index", "passing", "resolve_backend",
           "search_dir"]

class VectorIndex(Protocol):
    backend: str  # "pgvector" | "embedded"

    def upsert(self, session: Session, image_id: int, listing_id: int,
               vectors: dict[str, tuple[np.ndarray, str]]) -> None: ...

    def delete_image(self, session: Session, image_id: int) -> None: ...

    def delete_listing(self, session: Session, listing_id: int) -> None: ...

    def query(self, session: Session, vector: np.ndarray, k: int, filters: IndexFilters) -> list[Hit]: ...

    def rebuild(self, session: Session, progress: Callable[[int, int], None] | None = None) -> int: ...

    def count(self, session: Session, kind: str | None = None) -> int: ...

    def health(self, session: Session) -> IndexHealth: ...


def resolve_backend(settings: Settings, session: Session) -> str:
    """The backend ``CATALOG_SEARCH_BACKEND`` means for this database: pgvector | embedded | off.
    Raises :class:`SearchConfigError` when ``pgvector`` is asked for and cannot work."""
    wanted = settings.search_backend
    if wanted in ("off", "embedded"):
        return wanted
    has_column = pgvector_column(session)
    if wanted == "pgvector" and not has_column:
        dialect = session.get_bind().dialect.name
        why = ("the database is not Postgres" if dialect != "postgresql" else
               "the database has no pgvector column search_vectors.embedding (install the "
               "extension, then run `catalog search-index rebuild`)")
        raise SearchConfigError(f"CATALOG_SEARCH_BACKEND=pgvector cannot work: {why}.")
    return "pgvector" if has_column else "embedded"


def open_index(settings: Settings, bind: Session | Engine) -> VectorIndex:
    """The index ``CATALOG_SEARCH_BACKEND`` selects for this database (see the module doc).
    ``bind``: a session (used only to look at the schema) or an engine."""
    if settings.search_backend == "off":
        raise SearchConfigError("CATALOG_SEARCH_BACKEND=off: visual search is switched off.")
    if isinstance(bind, Session):
        backend = resolve_backend(settings, bind)
    else:
        with Session(bind) as session:
            backend = resolve_backend(settings, session)
    if backend == "pgvector":
        return PgVectorIndex(settings)
    return EmbeddedIndex.for_settings(settings)
