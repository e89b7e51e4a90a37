"""The pgvector backend: HNSW cosine indexes inside Postgres.

``search_vectors.embedding`` is a ``halfvec(1280)`` column (half-precision: 2.5 kB per vector,
half the memory of ``vector``, recall unchanged for unit vectors of this size) with one partial
HNSW index per kind (``m = 16``, ``ef_construction = 64``). It is filled in the transaction
that stores the image (:func:`worker.search.vectors.store_image_vectors`), so the index is
exactly as current as the database: a committed image is searchable, a rolled-back one never
was, a deleted listing's rows are gone at its commit.

A query is one SQL statement: the filters are joined in and the HNSW scan runs with
``hnsw.ef_search = CATALOG_SEARCH_EF_SEARCH`` and, on pgvector >= 0.8, ``hnsw.iterative_scan
= relaxed_order`` (the scan goes on past ``ef_search`` candidates until ``k`` rows pass the
filters, up to ``hnsw.max_scan_tuples``), so a selective filter does not starve the result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from sqlalchemy import Float, and_, bindparam, cast, func, literal_column, select, text
from sqlalchemy.orm import Session
from sqlalchemy.types import UserDefinedType

from db import models as m
from worker.config import Settings
from worker.search.common import Hit, IndexFilters, IndexHealth, filter_conditions
from worker.search.vectors import (
    KINDS,
    PGVECTOR_DIM,
    StoredVectors,
    backfill_from_embeddings,
    halfvec_literal,
    normalised,
    pgvector_column,
)

log = logging.getLogger(__name__)

#: The statements that give a Postgres database the pgvector column and indexes (the same as
#: migration 0007 runs where the extension is available).
SCHEMA = (
    "CREATE EXTENSION IF NOT EXISTS vector",
    f"ALTER TABLE search_vectors ADD COLUMN IF NOT EXISTS embedding halfvec({PGVECTOR_DIM})",
    "CREATE INDEX IF NOT EXISTS ix_search_vectors_hnsw_full ON search_vectors "
    "USING hnsw (embedding halfvec_cosine_ops) WITH (m = 16, ef_construction = 64) WHERE kind = 'full'",
    "CREATE INDEX IF NOT EXISTS ix_search_vectors_hnsw_region ON search_vectors "
    "USING hnsw (embedding halfvec_cosine_ops) WITH (m = 16, ef_construction = 64) WHERE kind = 'region'",
)


class HalfVec(UserDefinedType[str]):
    """pgvector's ``halfvec``, for casting the query's text form (``[0.1,...]``)."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "halfvec"


def extension_version(session: Session) -> tuple[int, ...] | None:
    """The installed pgvector version, or None."""
    row = session.execute(text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")).first()
    if row is None:
        return None
    return tuple(int(part) for part in str(row[0]).split(".") if part.isdigit())


def available_version(session: Session) -> str | None:
    row = session.execute(text(
        "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'")).first()
    return None if row is None else str(row[0])


def ensure_schema(session: Session) -> None:
    """Create the extension, the column and the HNSW indexes where they are missing (the
    caller commits). Raises the database's error when the server has no pgvector."""
    for statement in SCHEMA:
        session.execute(text(statement))
    pgvector_column(session, fresh=True)


class PgVectorIndex(StoredVectors):
    backend = "pgvector"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _tune(self, session: Session) -> None:
        session.execute(text("SELECT set_config('hnsw.ef_search', :ef, true)"),
                        {"ef": str(self.settings.search_ef_search)})
        version = extension_version(session) or (0,)
        if version >= (0, 8):
            session.execute(text("SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true)"))

    def query(self, session: Session, vector: np.ndarray, k: int, filters: IndexFilters) -> list[Hit]:
        if filters.kind not in KINDS:
            raise ValueError(f"unknown vector kind {filters.kind!r}")
        vec = normalised(vector)
        if vec.size != PGVECTOR_DIM:
            return []
        self._tune(session)
        sv = m.SearchVector
        query_vec = cast(bindparam("q", halfvec_literal(vec)), HalfVec())
        distance = literal_column("search_vectors.embedding").op("<=>", return_type=Float())(query_vec)
        conds: list[Any] = list(filter_conditions(filters))
        # The kind as a literal, so the planner can match the partial HNSW index of that kind.
        conds.append(text(f"search_vectors.kind = '{filters.kind}'"))
        conds.append(text("search_vectors.embedding IS NOT NULL"))
        stmt: Any = (select(sv.id, sv.image_id, sv.listing_id, sv.kind, distance.label("distance"))
                .join(m.Image, m.Image.id == sv.image_id).join(m.Listing, m.Listing.id == sv.listing_id)
                .where(and_(*conds)).order_by(distance).limit(int(k)))
        rows = session.execute(stmt).all()
        hits = [Hit(int(r[0]), int(r[1]), int(r[2]), str(r[3]), 1.0 - float(r[4])) for r in rows]
        return sorted(hits, key=lambda h: -h.score)  # relaxed_order may return a little unordered

    def rebuild(self, session: Session, progress: Callable[[int, int], None] | None = None) -> int:
        """Add what is missing (extension, column, indexes, vectors of images analysed before
        search existed) and fill every row whose column is empty; commits. Returns the rows
        the index holds."""
        ensure_schema(session)
        session.commit()
        backfill_from_embeddings(session)
        session.commit()
        total = session.execute(select(func.count()).select_from(m.SearchVector)
                                .where(m.SearchVector.dim == PGVECTOR_DIM)).scalar_one()
        done, last = 0, 0
        while True:
            rows = session.execute(text(
                "SELECT id, vector FROM search_vectors WHERE id > :last AND dim = :dim "
                "AND embedding IS NULL ORDER BY id LIMIT 1000"), {"last": last, "dim": PGVECTOR_DIM}).all()
            if not rows:
                break
            for row_id, blob in rows:
                vec = np.frombuffer(bytes(blob), dtype="<f4")
                session.execute(text("UPDATE search_vectors SET embedding = CAST(:v AS halfvec) WHERE id = :id"),
                                {"v": halfvec_literal(vec), "id": row_id})
            session.commit()
            done += len(rows)
            last = rows[-1][0]
            if progress is not None:
                progress(done, int(total))
        return self.count(session)

    def count(self, session: Session, kind: str | None = None) -> int:
        stmt = "SELECT count(*) FROM search_vectors WHERE embedding IS NOT NULL"
        if kind is not None:
            stmt += " AND kind = :kind"
        return int(session.execute(text(stmt), {"kind": kind} if kind else {}).scalar_one())

    def health(self, session: Session) -> IndexHealth:
        counts = {kind: self.count(session, kind) for kind in KINDS}
        missing = int(session.execute(text(
            "SELECT count(*) FROM search_vectors WHERE embedding IS NULL AND dim = :dim"),
            {"dim": PGVECTOR_DIM}).scalar_one())
        indexes = sorted(session.execute(text(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'search_vectors' "
            "AND indexdef ILIKE '%hnsw%'")).scalars())
        version = extension_version(session)
        ok = missing == 0 and len(indexes) == len(KINDS)
        detail = (f"pgvector {'.'.join(map(str, version or ()))}, {sum(counts.values())} vectors in "
                  f"{len(indexes)} HNSW index(es)")
        if missing:
            detail += f"; {missing} vector(s) not in the index: run `catalog search-index rebuild`"
        return IndexHealth("pgvector", ok, detail, counts,
                           {"hnsw_indexes": indexes, "unindexed": missing,
                            "ef_search": self.settings.search_ef_search})
