"""Stolen or re-used photos across sellers (step ``duplicates``).

How a copy is found:

1. every image is hashed in several views (:mod:`worker.fraud.fingerprint`): the whole image,
   the image without uniform borders, two central crops and eight off-centre crops, each with
   a 64-bit pHash and a 64-bit dHash; a new image also hashes its mirror image and ten
   query-only crops that sit between the stored ones;
2. each hash is cut into four 16-bit bands stored in ``image_hash_bands``; a new image looks up
   its own bands (and, by default, every band one bit away) with a B-tree index, which is
   guaranteed to find any stored hash within 7 bits (3 bits without the neighbour probes);
3. candidates are verified with the exact distance: the best pairing of a query view
   (mirrored or not) with a stored view, counting pHash + dHash differing bits (of 128);
4. when the tagging step produced an embedding, the cosine to the candidate's stored
   embedding confirms looser matches and vetoes hash collisions between unrelated photos.

Only matches that belong to a *different* seller raise ``duplicate_image``: a seller re-using
their own photo in several listings is normal.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from sqlalchemy import (
    Integer,
    any_,
    bindparam,
    delete,
    func,
    insert,
    select,
    text,
    union_all,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from db import models as m
from db.fraud_models import ImageHashBand
from worker.config import Settings
from worker.fraud.fingerprint import HASH_KINDS, HashValue, fingerprint, stored_part
from worker.io.hashing import to_signed64, to_unsigned64
from worker.pipeline.contract import Flag, ImageContext, StepResult

log = logging.getLogger(__name__)

BANDS = 4
BAND_BITS = 64 // BANDS
BAND_MASK = (1 << BAND_BITS) - 1
MAX_EVIDENCE_MATCHES = 5


def band_values(value: int) -> list[int]:
    """Split an unsigned 64-bit hash into its 16-bit bands, most significant first."""
    return [(value >> (64 - BAND_BITS * (i + 1))) & BAND_MASK for i in range(BANDS)]


def probe_values(band: int, neighbours: bool) -> list[int]:
    if not neighbours:
        return [band]
    return [band] + [band ^ (1 << bit) for bit in range(BAND_BITS)]


# --- the index ------------------------------------------------------------------------


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
        return [row.image_id for row in session.execute(stmt)]

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


# --- verification ---------------------------------------------------------------------


@dataclass(frozen=True)
class HashMatch:
    distance: int  # pHash + dHash differing bits, of 128
    phash_distance: int
    dhash_distance: int
    query_view: str
    stored_view: str
    mirrored: bool


def _views_matrix(hashes: list[HashValue]) -> tuple[list[tuple[str, bool]], np.ndarray]:
    by_view: dict[tuple[str, bool], dict[str, int]] = defaultdict(dict)
    for h in hashes:
        by_view[(h.view, h.mirrored)][h.kind] = h.value
    keys = [k for k, v in by_view.items() if all(kind in v for kind in HASH_KINDS)]
    mat = np.array([[by_view[k][kind] for kind in HASH_KINDS] for k in keys], dtype=np.uint64)
    return keys, mat.reshape(len(keys), len(HASH_KINDS))


def best_match(query: list[HashValue], stored: dict[str, dict[str, int]]) -> HashMatch | None:
    """The closest pairing of a query view with a stored view (both hash kinds summed)."""
    qkeys, qmat = _views_matrix(query)
    skeys = [v for v, kinds in stored.items() if all(k in kinds for k in HASH_KINDS)]
    if not qkeys or not skeys:
        return None
    smat = np.array([[stored[v][k] for k in HASH_KINDS] for v in skeys], dtype=np.uint64)
    per_kind = np.bitwise_count(qmat[:, None, :] ^ smat[None, :, :]).astype(np.int32)
    total = per_kind.sum(axis=2)
    qi, si = np.unravel_index(int(np.argmin(total)), total.shape)
    view, mirrored = qkeys[qi]
    return HashMatch(int(total[qi, si]), int(per_kind[qi, si, 0]), int(per_kind[qi, si, 1]),
                     view, skeys[si], mirrored)


def describe_edit(match: HashMatch) -> str:
    parts = []
    if match.mirrored:
        parts.append("mirrored")
    if match.query_view == "trim" or match.stored_view == "trim":
        parts.append("with a border added or removed")
    if match.query_view != match.stored_view and "trim" not in (match.query_view, match.stored_view):
        parts.append("cropped")
    return ", ".join(parts) if parts else "resized, re-compressed or retouched"


# --- the step -------------------------------------------------------------------------

LOCK_CLASS = 0x64757073  # "dups": advisory-lock namespace of the duplicate search


def lock_bands(session: Session, hashes: list[HashValue]) -> None:
    """Serialise near-duplicates that are processed at the same moment (Postgres).

    Without this, two copies analysed concurrently each search before the other has committed
    its hashes and neither is flagged. Every image takes a transaction-scoped advisory lock on
    each 16-bit band value of its whole-image hashes before searching; two images that share a band
    (the pigeonhole condition the index relies on) therefore run one after the other, and the
    second one's search sees the first one's committed rows. The locks are taken in one sorted
    statement, so two images never wait on each other in a cycle; they are released at commit.
    SQLite needs nothing: its writers are serialised already.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    # Only the whole-image view (and its mirror): the copies that arrive in bulk are whole
    # photos, and 16 keys instead of ~170 keep unrelated images from colliding on a band value
    # (~0.05 % of pairs instead of ~5 %), which would serialise them for no reason.
    keys = sorted({(HASH_KINDS.index(h.kind) << 20) | (band << 16) | ((h.value >> (16 * band)) & 0xFFFF)
                   for h in hashes if h.view == "full" for band in range(4)})
    session.execute(
        text("SELECT count(pg_advisory_xact_lock(:cls, k)) "
             "FROM (SELECT unnest(CAST(:keys AS int[])) AS k ORDER BY 1) AS ordered"),
        {"cls": LOCK_CLASS, "keys": keys},
    )


class DuplicatesStep:
    name: ClassVar[str] = "duplicates"
    requires: ClassVar[tuple[str, ...]] = ()
    VERSION: ClassVar[str] = "duplicates@1:phash+dhash,12-stored/21-query-views,4x16-bands"

    def version(self, settings: Settings) -> str:
        """A rules-only step: the version changes when its rules do."""
        return self.VERSION

    def run(self, ctx: ImageContext) -> StepResult:
        settings = ctx.settings
        query = fingerprint(ctx.image, query=True)
        stored_hashes = stored_part(query)
        data: dict[str, Any] = {
            "hashes": [{"kind": h.kind, "view": h.view, "value": f"{h.value:016x}"} for h in stored_hashes],
        }
        if ctx.db is None:
            data["searched"] = False
            return StepResult(data=data)

        lock_bands(ctx.db, query)
        ids = DuplicateIndex.candidates(
            ctx.db, query, exclude_image_id=ctx.image_id,
            neighbours=settings.duplicate_probe_neighbours, limit=settings.duplicate_max_candidates,
        )
        exact = self._same_bytes(ctx)
        candidate_ids = list(dict.fromkeys(exact + ids))
        info = self._image_info(ctx.db, candidate_ids)
        hashes = DuplicateIndex.load(ctx.db, candidate_ids)
        query_vec = _query_embedding(ctx)
        cosines = _cosines(ctx.db, query_vec, candidate_ids) if query_vec is not None else {}

        matches, same_seller = [], 0
        for cid in candidate_ids:
            row = info.get(cid)
            if row is None or row["listing_id"] == ctx.listing_id:
                continue
            if cid in exact:
                hm = HashMatch(0, 0, 0, "bytes", "bytes", False)
            else:
                hm = best_match(query, hashes.get(cid, {}))
                if hm is None:
                    continue
            cosine = cosines.get(cid)
            if not _accept(hm.distance, cosine, settings, identical=cid in exact):
                continue
            if row["seller_id"] == ctx.seller_id:
                same_seller += 1
                continue
            matches.append((hm, cosine, row))

        matches.sort(key=lambda item: (item[0].distance, -(item[1] or 0.0)))
        data.update({"searched": True, "candidates": len(candidate_ids),
                     "matches_other_sellers": len(matches), "matches_same_seller": same_seller,
                     "embedding_used": query_vec is not None})
        if not matches:
            return StepResult(data=data)

        evidence_matches = [_evidence(hm, cos, row) for hm, cos, row in matches[:MAX_EVIDENCE_MATCHES]]
        best_hm, best_cos, best_row = matches[0]
        score = max(0.5, 1.0 - best_hm.distance / 48.0)
        if best_cos is not None and best_cos >= settings.duplicate_confirm_cosine:
            score = max(score, min(1.0, best_cos))
        evidence = dict(evidence_matches[0])
        evidence["summary"] = _sentence(best_hm, best_cos, best_row, len(matches))
        evidence["matches"] = evidence_matches
        return StepResult(flags=[Flag("duplicate_image", round(score, 3), evidence)], data=data)

    def persist(self, session: Session, image_row: m.Image, result: StepResult) -> None:
        hashes = [HashValue(h["kind"], h["view"], False, int(h["value"], 16))
                  for h in result.data.get("hashes", [])]
        DuplicateIndex.store(session, image_row.id, hashes)

    # --- helpers ---------------------------------------------------------------------

    @staticmethod
    def _same_bytes(ctx: ImageContext) -> list[int]:
        if not ctx.sha256:
            return []
        stmt = select(m.Image.id).where(m.Image.sha256 == ctx.sha256, m.Image.id != ctx.image_id).limit(50)
        return list(ctx.db.execute(stmt).scalars())

    @staticmethod
    def _image_info(session: Session, ids: list[int]) -> dict[int, dict[str, Any]]:
        if not ids:
            return {}
        stmt = (
            select(m.Image.id, m.Image.listing_id, m.Image.created_at, m.Image.url,
                   m.Listing.external_id, m.Listing.seller_id, m.Listing.status)
            .join(m.Listing, m.Listing.id == m.Image.listing_id)
            .where(m.Image.id.in_(ids), m.Listing.status != "deleted")
        )
        return {row.id: row._asdict() for row in session.execute(stmt)}


def _accept(distance: int, cosine: float | None, settings: Any, *, identical: bool) -> bool:
    if identical:
        return True
    if cosine is not None and cosine < settings.duplicate_veto_cosine:
        return False
    if distance <= settings.duplicate_max_distance:
        return True
    return (cosine is not None and cosine >= settings.duplicate_confirm_cosine
            and distance <= settings.duplicate_max_distance_confirmed)


def _query_embedding(ctx: ImageContext) -> np.ndarray | None:
    tagging = ctx.results.get("tagging")
    vec = getattr(tagging, "embedding", None)
    if vec is None:
        return None
    vec = np.asarray(vec, dtype=np.float32).ravel()
    norm = float(np.linalg.norm(vec))
    return vec / norm if norm > 0 else None


def _cosines(session: Session, query: np.ndarray, ids: list[int]) -> dict[int, float]:
    """Cosine to each candidate's stored embedding of the same size (latest one wins)."""
    if not ids:
        return {}
    stmt = (select(m.Embedding.image_id, m.Embedding.vector)
            .where(m.Embedding.image_id.in_(ids), m.Embedding.dim == int(query.size))
            .order_by(m.Embedding.id))
    out = {}
    for image_id, blob in session.execute(stmt):
        vec = np.frombuffer(blob, dtype="<f4")
        norm = float(np.linalg.norm(vec))
        if norm > 0:
            out[image_id] = round(float(vec @ query) / norm, 4)
    return out


def _evidence(hm: HashMatch, cosine: float | None, row: dict[str, Any]) -> dict[str, Any]:
    return {
        "matched_image_id": row["id"],
        "matched_listing_id": row["listing_id"],
        "matched_listing_external_id": row["external_id"],
        "matched_seller_id": row["seller_id"],
        "matched_image_url": row["url"],
        "matched_first_seen": row["created_at"].isoformat() if row["created_at"] else None,
        "hash_kind": "sha256" if hm.query_view == "bytes" else "phash+dhash",
        "hamming_distance": hm.distance,
        "phash_distance": hm.phash_distance,
        "dhash_distance": hm.dhash_distance,
        "query_view": hm.query_view,
        "matched_view": hm.stored_view,
        "mirrored": hm.mirrored,
        "cosine": cosine,
    }


def _sentence(hm: HashMatch, cosine: float | None, row: dict[str, Any], count: int) -> str:
    if hm.query_view == "bytes":
        how = "It is byte-for-byte the same file"
    else:
        how = (f"It looks like a {describe_edit(hm)} copy: the perceptual hashes differ in "
               f"{hm.distance} of 128 bits")
        if cosine is not None:
            how += f" and the visual embeddings agree (cosine {cosine:.2f})"
    more = f" {count - 1} other seller photo(s) match too." if count > 1 else ""
    return (f"This photo matches image {row['id']} of listing {row['external_id']} "
            f"by another seller ({row['seller_id']}). {how}.{more}")
