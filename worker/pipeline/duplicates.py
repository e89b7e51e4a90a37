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

**Who uploaded first.** A copy is only theft if someone else had the photo first. Every copy
that matches (the image itself included, with its ``created_at``) is ordered by when it was
first seen (``images.created_at``, then id); when the earliest belongs to the uploader, the
uploader is the photo's owner re-using it and is not flagged, however many later copies other
sellers made. Every ``duplicate_image`` flag names the first upload in
``evidence["first_upload"]`` (seller, listing, image, time) and in its summary.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from datetime import UTC, datetime
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
from worker.pipeline.contract import Flag, StepResult
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
        if flags:
            flags, summary = _first_upload(session, wctx, query, candidates, flags, summary)
        DuplicateIndex.store(session, wctx.image_id, query.stored)
        return replace(result, flags=[*result.flags, *flags], data={**result.data, **summary})


def _first_upload(session: Session, wctx: WriteContext, query: DuplicateQuery, candidates: list[Candidate],
                  flags: list[Flag], summary: dict[str, Any]) -> tuple[list[Flag], dict[str, Any]]:
    """Drop the flag when the uploader owns the earliest copy; otherwise name the first upload
    in the flag's evidence (see the module doc)."""
    own_image = session.get_one(m.Image, wctx.image_id)
    own_listing = session.get_one(m.Listing, wctx.listing_id)
    copies = [_Upload(own_image.id, own_listing.id, own_listing.external_id, wctx.seller_id, own_image.created_at)]
    copies += [_Upload(c.image_id, c.listing_id, c.listing_external_id, c.seller_id, c.first_seen)
               for c in candidates if c.listing_id != wctx.listing_id and _is_copy(query, c, wctx)]
    first = min(copies, key=_Upload.order)
    summary = {**summary, "first_upload": first.evidence(),
               "first_upload_by_this_seller": first.seller_id == wctx.seller_id}
    if first.seller_id == wctx.seller_id:
        return [], summary
    out = []
    for flag in flags:
        evidence = dict(flag.evidence)
        evidence["first_upload"] = first.evidence()
        evidence["summary"] = (f"{evidence.get('summary', '')} The photo was first uploaded by seller "
                               f"{first.seller_id} (listing {first.listing_external_id}, "
                               f"{first.evidence()['first_seen'] or 'time unknown'}).").strip()
        out.append(replace(flag, evidence=evidence))
    return out, summary


def _is_copy(query: DuplicateQuery, candidate: Candidate, wctx: WriteContext) -> bool:
    """Whether :func:`assess` accepts ``candidate`` as a copy of the query, whoever owns it:
    asked as if the query came from a seller and listing that own nothing."""
    flags, _ = assess(query, [candidate], listing_id=-1, seller_id="\x00nobody", settings=wctx.settings)
    return bool(flags)


class _Upload:
    """One copy of the photo: whose, where, since when."""

    def __init__(self, image_id: int, listing_id: int, listing_external_id: str, seller_id: str,
                 first_seen: datetime | None) -> None:
        self.image_id, self.listing_id, self.listing_external_id = image_id, listing_id, listing_external_id
        self.seller_id = seller_id
        self.first_seen = None if first_seen is None else (
            first_seen if first_seen.tzinfo else first_seen.replace(tzinfo=UTC))

    def order(self) -> tuple[datetime, int]:
        return (self.first_seen or datetime.max.replace(tzinfo=UTC), self.image_id)

    def evidence(self) -> dict[str, Any]:
        return {"seller_id": self.seller_id, "listing_id": self.listing_id,
                "listing_external_id": self.listing_external_id, "image_id": self.image_id,
                "first_seen": self.first_seen.isoformat() if self.first_seen else None}
