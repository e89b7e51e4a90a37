"""The vectors visual search indexes: ``search_vectors`` rows, written with an image's results.

Kinds: ``full`` is the tagging step's embedding of the whole photo; ``region`` is the same
backbone's embedding of the product crop that the ``embedding`` step
(:mod:`worker.steps.embedding`) cut out around the segmentation box, else the main detection.
An image where no product region was found gets a ``region`` row equal to its ``full`` vector
(the product fills the photo), so a region search never misses it.

Writers (all inside the caller's transaction; none commits):

* :func:`store_image_vectors` -- called by the store transaction of ``worker.pipeline.analyze``
  after the generic rows: replaces the image's rows (a re-analysed image is re-indexed) and, on
  pgvector, fills the ``embedding`` column so the HNSW index has it at commit;
* :func:`remove_listing_vectors` -- called by ``listing.deleted`` (``worker.pipeline.events``);
* an image that fails loses its rows with its other results (``RESULT_TABLES`` of
  ``worker.pipeline.store``).

The embedded index reads these rows after they commit (see :mod:`worker.search.embedded`):
nothing here touches an index file, so a worker never writes one from inside a transaction.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import delete, insert, select, text
from sqlalchemy.orm import Session

from db import models as m
from worker.config import Settings
from worker.pipeline.contract import StepRun

KINDS = m.SEARCH_VECTOR_KINDS
#: The step whose embedding is the ``full`` vector, and the step that hands over the ``region``
#: vector (:mod:`worker.steps.embedding`, as ``StepResult.handoff``).
FULL_STEP, REGION_STEP = "tagging", "embedding"
#: Dimension of the pgvector column (EfficientNet-Lite0 pooled features).
PGVECTOR_DIM = 1280


def backbone(version: str) -> str:
    """The backbone part of a step version (``efficientnet-lite0-imagenet@ab12+category-head@..``
    -> ``efficientnet-lite0-imagenet@ab12``): vectors of one backbone are comparable."""
    return version.split("+", 1)[0]


def encode(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f4").ravel().tobytes()


def decode(blob: bytes) -> np.ndarray:
    return np.frombuffer(bytes(blob), dtype="<f4").astype(np.float32)


def normalised(vector: np.ndarray) -> np.ndarray:
    """float32, 1-d, unit length (a zero vector stays zero)."""
    vec = np.asarray(vector, dtype=np.float32).ravel()
    norm = float(np.linalg.norm(vec))
    return vec / norm if norm > 0 else vec


def halfvec_literal(vector: np.ndarray) -> str:
    """pgvector's text form, ``[0.1,0.2,...]``."""
    return "[" + ",".join(f"{v:.6g}" for v in np.asarray(vector, dtype=np.float32).ravel()) + "]"


def vectors_from_runs(runs: Sequence[StepRun]) -> dict[str, tuple[np.ndarray, str]]:
    """kind -> (unit vector, backbone version) from the runs of one analysis."""
    found: dict[str, tuple[np.ndarray, str]] = {}
    for run in runs:
        if run.status != "ok" or run.result is None:
            continue
        if run.step == FULL_STEP and run.result.embedding is not None:
            found["full"] = (normalised(run.result.embedding), backbone(run.version))
        elif run.step == REGION_STEP and isinstance(run.result.handoff, np.ndarray):
            found["region"] = (normalised(run.result.handoff), backbone(run.version))
    if "full" in found and "region" not in found:
        found["region"] = found["full"]
    if "region" in found and found["region"][1] != found.get("full", found["region"])[1]:
        found["region"] = found["full"]  # different backbones are not comparable: never mix
    return found


def store_image_vectors(session: Session, settings: Settings, *, image_id: int, listing_id: int,
                        runs: Sequence[StepRun]) -> int:
    """Store the image's search vectors from ``runs``; returns how many were stored. The caller
    removed the old ones (``search_vectors`` is one of the result tables the store transaction
    clears before a re-analysis; a first analysis has none). With
    ``CATALOG_SEARCH_BACKEND=off`` nothing is stored."""
    if settings.search_backend == "off":
        return 0
    return write_vectors(session, image_id=image_id, listing_id=listing_id, found=vectors_from_runs(runs))


def write_vectors(session: Session, *, image_id: int, listing_id: int,
                  found: dict[str, tuple[np.ndarray, str]]) -> int:
    """Insert the image's rows (the caller removed the old ones) and, on pgvector, their
    ``embedding`` column."""
    if not found:
        return 0
    rows = [{"image_id": image_id, "listing_id": listing_id, "kind": kind, "model_version": version,
             "dim": int(vec.size), "vector": encode(vec), "created_at": m.utcnow()}
            for kind, (vec, version) in sorted(found.items())]
    ids = session.execute(insert(m.SearchVector).returning(m.SearchVector.id, m.SearchVector.kind),
                          rows).all()
    if pgvector_column(session):
        by_kind = {kind: vec for kind, (vec, _) in found.items()}
        for row_id, kind in ids:
            vec = by_kind[kind]
            if vec.size == PGVECTOR_DIM:
                session.execute(text("UPDATE search_vectors SET embedding = CAST(:v AS halfvec) WHERE id = :id"),
                                {"v": halfvec_literal(vec), "id": row_id})
    return len(rows)


def remove_listing_vectors(session: Session, listing_id: int) -> int:
    """Take a deleted listing's images out of the index (their other results stay)."""
    result: Any = session.execute(delete(m.SearchVector).where(m.SearchVector.listing_id == listing_id))
    return int(result.rowcount or 0)


class StoredVectors:
    """The write side both index backends share: the rows of ``search_vectors`` are the truth
    (pgvector indexes their ``embedding`` column; the embedded index catches up from them)."""

    def upsert(self, session: Session, image_id: int, listing_id: int,
               vectors: dict[str, tuple[np.ndarray, str]]) -> None:
        self.delete_image(session, image_id)
        write_vectors(session, image_id=image_id, listing_id=listing_id,
                      found={k: (normalised(v), ver) for k, (v, ver) in vectors.items()})

    def delete_image(self, session: Session, image_id: int) -> None:
        session.execute(delete(m.SearchVector).where(m.SearchVector.image_id == image_id))

    def delete_listing(self, session: Session, listing_id: int) -> None:
        remove_listing_vectors(session, listing_id)


def backfill_from_embeddings(session: Session, progress: Any = None) -> int:
    """Give every analysed image of a live listing that has no search vectors yet its ``full``
    (and, as a copy, ``region``) vector from its stored tagging embedding: images analysed
    before search existed. Returns how many images got vectors."""
    img, emb = m.Image, m.Embedding
    have = select(m.SearchVector.image_id).where(m.SearchVector.image_id == img.id).exists()
    done, last = 0, 0
    while True:
        rows = session.execute(
            select(emb.id, emb.image_id, img.listing_id, emb.model_version, emb.vector)
            .join(img, img.id == emb.image_id).join(m.Listing, m.Listing.id == img.listing_id)
            .where(emb.id > last, img.status == "done", m.Listing.status != "deleted", ~have)
            .order_by(emb.id).limit(500)).all()
        if not rows:
            return done
        for _, image_id, listing_id, version, blob in rows:
            vec = normalised(decode(blob))
            found = {"full": (vec, backbone(version)), "region": (vec, backbone(version))}
            session.execute(delete(m.SearchVector).where(m.SearchVector.image_id == image_id))
            done += bool(write_vectors(session, image_id=image_id, listing_id=listing_id, found=found))
        last = rows[-1][0]
        if progress is not None:
            progress(done)


#: engine URL -> (checked at, has the column); re-checked every minute so that a column added
#: by ``catalog search-index rebuild`` reaches running workers.
_COLUMN_CACHE: dict[str, tuple[float, bool]] = {}
COLUMN_CACHE_SECONDS = 60.0


def pgvector_column(session: Session, *, fresh: bool = False) -> bool:
    """Whether ``search_vectors.embedding`` (the pgvector column) exists in this database."""
    bind = session.get_bind()
    if bind.dialect.name != "postgresql":
        return False
    key = str(bind.engine.url)
    cached = _COLUMN_CACHE.get(key)
    now = time.monotonic()
    if cached is not None and not fresh and now - cached[0] < COLUMN_CACHE_SECONDS:
        return cached[1]
    present = session.execute(text(
        "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
        "AND table_name = 'search_vectors' AND column_name = 'embedding'")).first() is not None
    _COLUMN_CACHE[key] = (now, present)
    return present
