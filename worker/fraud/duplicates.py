"""Stolen or re-used photos across sellers (step ``duplicates``): the pure part.

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

Split between this module and :mod:`worker.pipeline.duplicates`: the step (1, and the query
embedding of 4) is a pure function of the image and the settings and runs with no database
transaction open; it hands a :class:`DuplicateQuery` to the pipeline's writer, which runs in
the transaction that stores the image: it locks the query's bands, looks up and loads the
candidates (2, 4), calls :func:`assess` (3 and the decision, pure again) and stores the
image's own bands.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

import numpy as np

from worker.config import Settings
from worker.fraud.fingerprint import HASH_KINDS, VALUES, HashValue, fingerprint, stored_part
from worker.pipeline.contract import Flag, ImageContext, StepResult

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


def lock_keys(hashes: list[HashValue]) -> list[int]:
    """The advisory-lock keys of an image's search (see ``worker.pipeline.duplicates.lock_bands``).

    Only the whole-image view (and its mirror): the copies that arrive in bulk are whole
    photos, and 16 keys instead of ~170 keep unrelated images from colliding on a band value
    (~0.05 % of pairs instead of ~5 %), which would serialise them for no reason. Sorted, so
    that two images never wait on each other in a cycle.
    """
    return sorted({(HASH_KINDS.index(h.kind) << 20) | (band << 16) | ((h.value >> (16 * band)) & 0xFFFF)
                   for h in hashes if h.view == "full" for band in range(BANDS)})


# --- what the step hands to the store transaction ----------------------------------------


@dataclass(frozen=True)
class DuplicateQuery:
    """Everything the search needs that comes from the image itself (computed without the
    database): the query hashes, the hashes the index keeps, the bytes' digest and the
    normalised embedding of the tagging step, when there is one."""

    query: list[HashValue]  # all views, mirror image and query-only crops included
    stored: list[HashValue]  # the unmirrored views kept in image_hash_bands
    sha256: str
    embedding: np.ndarray | None = None


@dataclass(frozen=True)
class Candidate:
    """A stored image the index (or the same bytes) proposed, as the database describes it."""

    image_id: int
    listing_id: int
    listing_external_id: str
    seller_id: str
    url: str
    first_seen: datetime | None
    hashes: dict[str, dict[str, int]] = field(default_factory=dict)  # view -> kind -> unsigned hash
    identical: bool = False  # same sha256 as the query's bytes
    cosine: float | None = None  # to the candidate's stored embedding of the same size


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


# --- the decision ---------------------------------------------------------------------


def assess(query: DuplicateQuery, candidates: list[Candidate], *, listing_id: int, seller_id: str,
           settings: Settings) -> tuple[list[Flag], dict[str, Any]]:
    """Decide on the candidates the database proposed: the ``duplicate_image`` flag (if any
    other seller's photo matches) and the search summary for ``step_runs.output``."""
    matches: list[tuple[HashMatch, Candidate]] = []
    same_seller = 0
    for cand in candidates:
        if cand.listing_id == listing_id:
            continue  # the listing's own images (e.g. the same photo twice) are not fraud
        if cand.identical:
            hm: HashMatch | None = HashMatch(0, 0, 0, "bytes", "bytes", False)
        else:
            hm = best_match(query.query, cand.hashes)
        if hm is None or not _accept(hm.distance, cand.cosine, settings, identical=cand.identical):
            continue
        if cand.seller_id == seller_id:
            same_seller += 1
            continue
        matches.append((hm, cand))

    matches.sort(key=lambda item: (item[0].distance, -(item[1].cosine or 0.0)))
    data: dict[str, Any] = {"searched": True, "candidates": len(candidates),
                            "matches_other_sellers": len(matches), "matches_same_seller": same_seller,
                            "embedding_used": query.embedding is not None}
    if not matches:
        return [], data

    evidence_matches = [_evidence(hm, cand) for hm, cand in matches[:MAX_EVIDENCE_MATCHES]]
    best_hm, best = matches[0]
    score = max(0.5, 1.0 - best_hm.distance / 48.0)
    if best.cosine is not None and best.cosine >= settings.duplicate_confirm_cosine:
        score = max(score, min(1.0, best.cosine))
    evidence = dict(evidence_matches[0])
    evidence["summary"] = _sentence(best_hm, best, len(matches))
    evidence["matches"] = evidence_matches
    return [Flag("duplicate_image", round(score, 3), evidence)], data


# --- the step -------------------------------------------------------------------------


class DuplicatesStep:
    """Hashes the photo; the search itself runs in the store transaction
    (``worker.pipeline.duplicates.DuplicatesWriter``), where it can be locked against a
    concurrent copy until this image's bands are committed."""

    name: ClassVar[str] = "duplicates"
    requires: ClassVar[tuple[str, ...]] = ()
    # @2: the views are boxes on a 256 px grey working copy (VALUES); @1 cut them from a 512 px
    # RGB thumbnail. The values are near, not equal (1.4 of 128 bits per view on average on
    # the bench photos): an index built by @1 keeps matching @2 queries (bench.duplicates
    # --stored-tree), and `catalog backfill --model duplicates` hashes the older images again.
    VERSION: ClassVar[str] = f"duplicates@2:phash+dhash,12-stored/21-query-views,4x16-bands,{VALUES}"

    def version(self, settings: Settings) -> str:
        """A rules-only step: the version changes when its rules do."""
        return self.VERSION

    def run(self, ctx: ImageContext) -> StepResult:
        # The full-resolution grey copy other steps share (only grey levels are hashed).
        query = fingerprint(ctx.shared("grey", lambda: ctx.image.convert("L")), query=True)
        stored = stored_part(query)
        data: dict[str, Any] = {
            "hashes": [{"kind": h.kind, "view": h.view, "value": f"{h.value:016x}"} for h in stored],
            "searched": False,  # the writer sets the search summary
        }
        handoff = DuplicateQuery(query=query, stored=stored, sha256=ctx.sha256,
                                 embedding=_query_embedding(ctx))
        return StepResult(data=data, handoff=handoff)


# --- helpers ---------------------------------------------------------------------------


def _accept(distance: int, cosine: float | None, settings: Settings, *, identical: bool) -> bool:
    if identical:
        return True
    if cosine is not None and cosine < settings.duplicate_veto_cosine:
        return False
    if distance <= settings.duplicate_max_distance:
        return True
    return (cosine is not None and cosine >= settings.duplicate_confirm_cosine
            and distance <= settings.duplicate_max_distance_confirmed)


def _query_embedding(ctx: ImageContext) -> np.ndarray | None:
    """The tagging step's embedding, L2-normalised (it ran earlier in CATALOG_STEPS)."""
    tagging = ctx.results.get("tagging")
    vec = getattr(tagging, "embedding", None)
    if vec is None:
        return None
    vec = np.asarray(vec, dtype=np.float32).ravel()
    norm = float(np.linalg.norm(vec))
    return vec / norm if norm > 0 else None


def cosine_to(query: np.ndarray, stored: bytes) -> float | None:
    """Cosine between the normalised query and a stored little-endian float32 vector."""
    vec = np.frombuffer(stored, dtype="<f4")
    if vec.size != query.size:
        return None
    norm = float(np.linalg.norm(vec))
    return round(float(vec @ query) / norm, 4) if norm > 0 else None


def _evidence(hm: HashMatch, cand: Candidate) -> dict[str, Any]:
    return {
        "matched_image_id": cand.image_id,
        "matched_listing_id": cand.listing_id,
        "matched_listing_external_id": cand.listing_external_id,
        "matched_seller_id": cand.seller_id,
        "matched_image_url": cand.url,
        "matched_first_seen": cand.first_seen.isoformat() if cand.first_seen else None,
        "hash_kind": "sha256" if hm.query_view == "bytes" else "phash+dhash",
        "hamming_distance": hm.distance,
        "phash_distance": hm.phash_distance,
        "dhash_distance": hm.dhash_distance,
        "query_view": hm.query_view,
        "matched_view": hm.stored_view,
        "mirrored": hm.mirrored,
        "cosine": cand.cosine,
    }


def _sentence(hm: HashMatch, cand: Candidate, count: int) -> str:
    if hm.query_view == "bytes":
        how = "It is byte-for-byte the same file"
    else:
        how = (f"It looks like a {describe_edit(hm)} copy: the perceptual hashes differ in "
               f"{hm.distance} of 128 bits")
        if cand.cosine is not None:
            how += f" and the visual embeddings agree (cosine {cand.cosine:.2f})"
    more = f" {count - 1} other seller photo(s) match too." if count > 1 else ""
    return (f"This photo matches image {cand.image_id} of listing {cand.listing_external_id} "
            f"by another seller ({cand.seller_id}). {how}.{more}")
