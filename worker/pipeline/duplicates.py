"""The database side of the duplicate search: the band index, its locks, the candidates.

The ``duplicates`` step (:mod:`worker.fraud.duplicates`) only hashes the photo, with no
transaction open. :class:`DuplicatesWriter` runs in the transaction that stores the image:

1. lock the query's bands (:func:`lock_bands`, Postgres advisory locks held until commit);
2. look up candidates in ``image_hash_bands`` and images with the same bytes, and load their
   hashes, listings and embeddings;
3. let :func:`worker.fraud.duplicates.assess` decide (pure) and add its flag to the result;
4. replace the image's own band rows.

Because the lock is taken before the search and released only when the band rows are
committed, two copies of one photo analysed at the same moment by two workers run one after
the other, and the second one's search sees the first one's rows.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import Any, ClassVar

from sqlalchemy import Integer, any_, bindparam, delete, func, insert, select, text, union_all
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from db import models as m
from db.fraud_models import ImageHashBand
from worker.fraud.duplicates import (
    Candidate,
    DuplicateQuery,
    assess,
    band_values,
    cosine_to,
    lock_keys,
    probe_values,
)
from worker.fraud.fingerprint import HashValue
from worker.io.hashing import to_signed64, to_unsigned64
from worker.pipeline.contract import StepResult
from worker.pipeline.writers import WriteContext

LOCK_CLASS = 0x64757073  # "dups": advisory-lock namespace of the duplicate search
MAX_SAME_BYTES = 50


class DuplicateIndex:
    """Reads and writes ``image_hash_bands``. All methods take the caller's session."""

    @staticmethod
    def rows(image_id: int, hashes: list[HashValue]) -> list[dict[str, Any]]:
        out = []
        for h in hashes:
            if h.mirrored:
                continue  # stored images keep unmirrored views; queries add the mirror
            for band_no, band in enumerate(band_values(h.value)):
                out.append({"image_id": image_id, "view": h.view, "hash_kind": h.kind,
                            "band_no": band_no, "band_value": band,
                            "hash_value": to_signed64(h.value)})
        return out

    @classmethod
    def store(cls, session: Session, image_id: int, hashes: list[HashValue]) -> None:
        """Replace the image's rows (idempotent: re-processing never duplicates rows)."""
        session.execute(delete(ImageHashBand).where(ImageHashBand.image_id == image_id))
        rows = cls.rows(image_id, hashes)
        if rows:
            session.execute(insert(ImageHashBand), rows)

    @staticmethod
    def candidates(session: Session, hashes: list[HashValue], *, exclude_image_id: int | None,
                   neighbours: bool, limit: int) -> list[int]:
        """Image ids sharing at least one (probed) band, most shared bands first."""
        probes: dict[tuple[str, int], set[int]] = defaultdict(set)
        for h in hashes:
            for band_no, band in enumerate(band_values(h.value)):
                probes[(h.kind, band_no)].update(probe_values(band, neighbours))
        if not probes:
            return []
        t = ImageHashBand.__table__.c
        is_pg = session.get_bind().dialect.name == "postgresql"
        # One arm per (kind, band): each is a plain range of the lookup index, which Postgres
        # answers with an index-only scan (an OR of the arms would need a bitmap heap scan).
        arms = []
        for i, ((kind, band_no), values) in enumerate(sorted(probes.items())):
            if is_pg:  # one array parameter instead of thousands of bind parameters
                match = t.band_value == any_(
                    bindparam(f"probe_{i}", sorted(values), type_=ARRAY(Integer)))
            else:
                match = t.band_value.in_(sorted(values))
            arm = select(t.image_id).where(t.hash_kind == kind, t.band_no == band_no, match)
            if exclude_image_id is not None:
                arm = arm.where(t.image_id != exclude_image_id)
            arms.append(arm)
        hits_sub = union_all(*arms).subquery("hits")
        hits = func.count().label("hits")
        stmt = (select(hits_sub.c.image_id, hits).group_by(hits_sub.c.image_id)
                .order_by(hits.desc(), hits_sub.c.image_id).limit(limit))
        return [int(row.image_id) for row in session.execute(stmt)]

    @staticmethod
    def load(session: Session, image_ids: list[int]) -> dict[int, dict[str, dict[str, int]]]:
        """image id -> view -> kind -> unsigned hash."""
        out: dict[int, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(dict))
        if not image_ids:
            return out
        t = ImageHashBand.__table__.c
        stmt = select(t.image_id, t.view, t.hash_kind, t.hash_value).where(
            t.band_no == 0, t.image_id.in_(image_ids))
        for row in session.execute(stmt):
            out[row.image_id][row.view][row.hash_kind] = to_unsigned64(row.hash_value)
        return out


def lock_bands(session: Session, hashes: list[HashValue]) -> None:
    """Serialise near-duplicates that are processed at the same moment (Postgres).

    Without this, two copies analysed concurrently each search before the other has committed
    its hashes and neither is flagged. Every image takes a transaction-scoped advisory lock on
    each 16-bit band value of its whole-image hashes before searching; two images that share a
    band (the pigeonhole condition the index relies on) therefore run one after the other, and
    the second one's search sees the first one's committed rows. The locks are taken in one
    sorted statement, so two images never wait on each other in a cycle; they are released at
    commit. SQLite needs nothing: its writers are serialised already.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    session.execute(
        text("SELECT count(pg_advisory_xact_lock(:cls, k)) "
             "FROM (SELECT unnest(CAST(:keys AS int[])) AS k ORDER BY 1) AS ordered"),
        {"cls": LOCK_CLASS, "keys": lock_keys(hashes)},
    )


def find_candidates(session: Session, query: DuplicateQuery, *, image_id: int,
                    neighbours: bool, limit: int) -> list[Candidate]:
    """Stored images that may be copies of the query: same bytes first, then the band index;
    with their listing, stored hashes and (when the query has an embedding) cosine."""
    exact: list[int] = []
    if query.sha256:
        exact = [int(i) for i in session.execute(
            select(m.Image.id).where(m.Image.sha256 == query.sha256, m.Image.id != image_id)
            .limit(MAX_SAME_BYTES)).scalars()]
    similar = DuplicateIndex.candidates(session, query.query, exclude_image_id=image_id,
                                        neighbours=neighbours, limit=limit)
    ids = list(dict.fromkeys(exact + similar))
    if not ids:
        return []
    rows = session.execute(
        select(m.Image.id, m.Image.listing_id, m.Image.created_at, m.Image.url,
               m.Listing.external_id, m.Listing.seller_id)
        .join(m.Listing, m.Listing.id == m.Image.listing_id)
        .where(m.Image.id.in_(ids), m.Listing.status != "deleted")
    ).all()
    hashes = DuplicateIndex.load(session, ids)
    cosines = _cosines(session, query, ids)
    by_id = {row.id: row for row in rows}
    same_bytes = set(exact)
    return [
        Candidate(image_id=row.id, listing_id=row.listing_id, listing_external_id=row.external_id,
                  seller_id=row.seller_id, url=row.url, first_seen=row.created_at,
                  hashes=hashes.get(row.id, {}), identical=row.id in same_bytes,
                  cosine=cosines.get(row.id))
        for row in (by_id[i] for i in ids if i in by_id)
    ]


def _cosines(session: Session, query: DuplicateQuery, ids: list[int]) -> dict[int, float]:
    """Cosine to each candidate's stored embedding of the same size (latest one wins)."""
    if query.embedding is None:
        return {}
    stmt = (select(m.Embedding.image_id, m.Embedding.vector)
            .where(m.Embedding.image_id.in_(ids), m.Embedding.dim == int(query.embedding.size))
            .order_by(m.Embedding.id))
    out: dict[int, float] = {}
    for image_id, blob in session.execute(stmt):
        cosine = cosine_to(query.embedding, blob)
        if cosine is not None:
            out[image_id] = cosine
    return out


class DuplicatesWriter:
    """Completes and stores the ``duplicates`` step's result in the store transaction."""

    step: ClassVar[str] = "duplicates"

    def write(self, wctx: WriteContext, result: StepResult) -> StepResult:
        query = result.handoff
        if not isinstance(query, DuplicateQuery):
            raise TypeError(f"the duplicates step handed over {type(query).__name__}, not DuplicateQuery")
        session, settings = wctx.session, wctx.settings
        lock_bands(session, query.query)  # held until this transaction commits the bands below
        candidates = find_candidates(session, query, image_id=wctx.image_id,
                                     neighbours=settings.duplicate_probe_neighbours,
                                     limit=settings.duplicate_max_candidates)
        flags, summary = assess(query, candidates, listing_id=wctx.listing_id,
                                seller_id=wctx.seller_id, settings=settings)
        DuplicateIndex.store(session, wctx.image_id, query.stored)
        return replace(result, flags=[*result.flags, *flags], data={**result.data, **summary})
