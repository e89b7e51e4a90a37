""""More like this": listings whose photos look like a query vector.

Interface (the CLI ``catalog similar`` and the HTTP routes call these; nothing else):

* :func:`vector_for_image` / :func:`vector_for_listing` -> :class:`QueryVector`: the stored
  search vector of an image (or of a listing's first analysed image), with what a query needs
  to exclude itself (image, listing, seller) and its tags (for "why"). Unknown listing or
  image, deleted listing, an image that failed analysis or is still pending, no stored vector:
  :class:`~worker.search.errors.SearchError` with a stable ``code`` and a one-sentence message.
* :class:`SimilarQuery`: a vector plus ``k`` (1..:data:`MAX_K`) and filters: ``category``
  (declared or predicted), ``object_label`` (a detection), ``colour`` (a colour tag),
  ``sellers`` (only these), ``exclude_sellers``, ``statuses`` (listing statuses; deleted never),
  ``include_own_seller`` (by default the query's own seller is left out: recommendations point
  to other shops). Build one from a stored image with ``SimilarQuery.from_vector(qv, k=...)``,
  or from an uploaded photo's vector with ``SimilarQuery(vector=..., model_version=...)``
  (compute it with :func:`worker.steps.embedding.embed_photo`).
* :func:`similar` -> ``list[Result]``, best first: one result per listing (its best-matching
  image), near-identical photos collapsed (same bytes, pHash+dHash within
  ``CATALOG_DUPLICATE_MAX_DISTANCE``, a ``duplicate_image`` flag between them, or vectors with a
  cosine of at least :data:`NEAR_IDENTICAL`): the best one stays, the others are listed in
  ``Result.collapsed``. ``Result.why`` names the tags the result shares with the query.

The vector kind searched is ``CATALOG_SEARCH_EMBEDDING`` (``region`` by default) unless the
query says otherwise. Deleted listings and images that are not ``done`` are never returned
(checked in the database, whatever the backend).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from db import models as m
from worker.config import Settings
from worker.search.errors import SearchConfigError, SearchError
from worker.search.index import QUERY_STATUSES, Hit, IndexFilters, VectorIndex, open_index
from worker.search.vectors import KINDS, decode, normalised

MAX_K = 100
#: Cosine at or above which two results are the same photo for collapsing.
NEAR_IDENTICAL = 0.97
#: Tag sources whose names explain a match (not scores of other models' internals).
WHY_SOURCES = ("imagenet", "category-map", "category-head", "colour", "attribute-head", "detection")
#: Most index hits one query looks through to fill ``k`` results after collapsing.
MAX_FETCH = 2000


@dataclass(frozen=True)
class QueryVector:
    vector: np.ndarray
    kind: str
    model_version: str
    image_id: int | None = None
    listing_id: int | None = None
    seller_id: str | None = None
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class SimilarQuery:
    vector: np.ndarray
    k: int = 10
    kind: str | None = None  # None: CATALOG_SEARCH_EMBEDDING
    model_version: str | None = None  # only vectors of this backbone (None: any of the same size)
    image_id: int | None = None  # the query's own image: never returned
    listing_id: int | None = None  # the query's own listing: never returned
    seller_id: str | None = None  # the query's seller: left out unless include_own_seller
    include_own_seller: bool = False
    sellers: tuple[str, ...] = ()
    exclude_sellers: tuple[str, ...] = ()
    category: str | None = None
    object_label: str | None = None
    colour: str | None = None
    statuses: tuple[str, ...] = QUERY_STATUSES
    query_tags: tuple[str, ...] = ()  # for "why"
    collapse: bool = True

    @classmethod
    def from_vector(cls, qv: QueryVector, **options: Any) -> SimilarQuery:
        return cls(vector=qv.vector, kind=qv.kind, model_version=qv.model_version, image_id=qv.image_id,
                   listing_id=qv.listing_id, seller_id=qv.seller_id, query_tags=qv.tags, **options)

    def checked(self, settings: Settings) -> SimilarQuery:
        """The query with its kind resolved, or SearchError(bad_request)."""
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= MAX_K:
            raise SearchError("bad_request", f"k must be a whole number from 1 to {MAX_K}, not {self.k!r}.")
        kind = self.kind or settings.search_embedding
        if kind not in KINDS:
            raise SearchError("bad_request", f"kind must be one of {', '.join(KINDS)}, not {kind!r}.")
        bad = [s for s in self.statuses if s not in QUERY_STATUSES]
        if bad:
            raise SearchError("bad_request", f"listing status must be among {', '.join(QUERY_STATUSES)}, "
                                             f"not {', '.join(map(repr, bad))}.")
        vec = np.asarray(self.vector, dtype=np.float32).ravel()
        if vec.size == 0 or not np.all(np.isfinite(vec)) or not np.any(vec):
            raise SearchError("bad_request", "the query vector is empty, zero or not finite.")
        return replace(self, kind=kind, vector=normalised(vec))


@dataclass
class Result:
    listing_id: int
    external_id: str
    seller_id: str
    title: str
    category: str | None
    status: str
    image_id: int
    image_url: str
    score: float  # cosine similarity of the matching image's vector to the query
    why: list[str] = field(default_factory=list)  # tags shared with the query
    collapsed: list[int] = field(default_factory=list)  # near-identical image ids folded into this one

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- query vectors ----------------------------------------------------------------------------


def _tags(session: Session, image_id: int) -> tuple[str, ...]:
    names = session.execute(select(m.Tag.name).where(m.Tag.image_id == image_id, m.Tag.source.in_(WHY_SOURCES))
                            .order_by(m.Tag.score.desc())).scalars()
    labels = session.execute(select(m.Detection.label).where(m.Detection.image_id == image_id)
                             .order_by(m.Detection.score.desc())).scalars()
    return tuple(dict.fromkeys([*names, *labels]))


def vector_for_image(session: Session, settings: Settings, image_id: int, kind: str | None = None) -> QueryVector:
    """The stored search vector of one image (``kind`` default ``CATALOG_SEARCH_EMBEDDING``)."""
    kind = kind or settings.search_embedding
    image = session.get(m.Image, image_id)
    if image is None:
        raise SearchError("unknown_image", f"There is no image {image_id}.")
    listing = session.get_one(m.Listing, image.listing_id)
    if listing.status == "deleted":
        raise SearchError("listing_deleted", f"Image {image_id} belongs to listing {listing.external_id}, "
                                             "which was deleted.")
    if image.status == "failed":
        reason = (image.error or "no reason recorded").split("\n", 1)[0][:200]
        raise SearchError("image_failed", f"Image {image_id} failed analysis ({reason}), so it has no vector "
                                          "to search with.")
    if image.status != "done":
        raise SearchError("image_pending", f"Image {image_id} has not been analysed yet; try again when it is done.")
    row = session.execute(select(m.SearchVector.vector, m.SearchVector.model_version).where(
        m.SearchVector.image_id == image_id, m.SearchVector.kind == kind)).first()
    if row is None:
        raise SearchError("no_embedding", f"Image {image_id} has no {kind} search vector (its tagging step did "
                                          "not run or failed); analyse it again or run `catalog search-index rebuild`.")
    return QueryVector(decode(row[0]), kind, str(row[1]), image_id, listing.id, listing.seller_id,
                       _tags(session, image_id))


def find_listing(session: Session, ref: int | str) -> m.Listing | None:
    """A listing by its external id (what producers and people use), else by its numeric id."""
    listing = session.execute(select(m.Listing).where(m.Listing.external_id == str(ref))).scalar_one_or_none()
    if listing is None and str(ref).isdigit():
        listing = session.get(m.Listing, int(ref))
    return listing


def vector_for_listing(session: Session, settings: Settings, listing_ref: int | str,
                       kind: str | None = None) -> QueryVector:
    """The search vector of the listing's first analysed image that has one (by position)."""
    kind = kind or settings.search_embedding
    listing = find_listing(session, listing_ref)
    if listing is None:
        raise SearchError("unknown_listing", f"There is no listing {listing_ref}.")
    if listing.status == "deleted":
        raise SearchError("listing_deleted", f"Listing {listing.external_id} was deleted.")
    images = session.execute(select(m.Image).where(m.Image.listing_id == listing.id)
                             .order_by(m.Image.position, m.Image.id)).scalars().all()
    if not images:
        raise SearchError("no_embedding", f"Listing {listing.external_id} has no images.")
    for image in images:
        if image.status == "done":
            try:
                return vector_for_image(session, settings, image.id, kind)
            except SearchError as exc:
                if exc.code != "no_embedding":
                    raise
    states = sorted({image.status for image in images})
    if states == ["failed"]:
        raise SearchError("image_failed", f"Every image of listing {listing.external_id} failed analysis.")
    if "done" not in states:
        raise SearchError("image_pending", f"No image of listing {listing.external_id} has been analysed yet.")
    raise SearchError("no_embedding", f"No image of listing {listing.external_id} has a {kind} search vector; "
                                      "run `catalog search-index rebuild`.")


# --- the query ----------------------------------------------------------------------------------


def _index(session: Session, settings: Settings, index: VectorIndex | None) -> VectorIndex:
    if index is not None:
        return index
    if settings.search_backend == "off":
        raise SearchError("search_off", "Visual search is switched off (CATALOG_SEARCH_BACKEND=off).")
    try:
        return open_index(settings, session)
    except SearchConfigError as exc:
        raise SearchError("search_off", str(exc)) from None


def similar(session: Session, settings: Settings, query: SimilarQuery,
            index: VectorIndex | None = None) -> list[Result]:
    """Listings that look like ``query.vector``, best first (see the module doc). Reads only."""
    query = query.checked(settings)
    index = _index(session, settings, index)
    assert query.kind is not None
    exclude_sellers = tuple(query.exclude_sellers)
    if query.seller_id and not query.include_own_seller:
        exclude_sellers += (query.seller_id,)
    filters = IndexFilters(
        kind=query.kind, model_version=query.model_version, dim=int(query.vector.size),
        exclude_image_ids=(query.image_id,) if query.image_id is not None else (),
        exclude_listing_ids=(query.listing_id,) if query.listing_id is not None else (),
        sellers=tuple(query.sellers), exclude_sellers=exclude_sellers, listing_statuses=tuple(query.statuses),
        category=query.category, object_label=query.object_label, colour=query.colour)
    fetch = query.k * 4 + 16
    while True:
        hits = index.query(session, query.vector, fetch, filters)
        groups = _collapse(session, settings, hits, query.collapse)
        if len(groups) >= query.k or len(hits) < fetch or fetch >= MAX_FETCH:
            break
        fetch = min(fetch * 4, MAX_FETCH)
    return _results(session, groups[:query.k], set(query.query_tags))


def _collapse(session: Session, settings: Settings, hits: Sequence[Hit], collapse: bool) -> list[list[Hit]]:
    """Hits grouped: one group per listing, and (``collapse``) near-identical photos of
    different listings in one group; each group best first, groups by their best hit."""
    hits = sorted(hits, key=lambda h: -h.score)
    parent = list(range(len(hits)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)  # the better hit's root stays the root

    first_of_listing: dict[int, int] = {}
    for i, hit in enumerate(hits):
        if hit.listing_id in first_of_listing:
            union(first_of_listing[hit.listing_id], i)
        else:
            first_of_listing[hit.listing_id] = i
    if collapse and len(hits) > 1:
        _link_near_identical(session, settings, hits, union)
    groups: dict[int, list[Hit]] = {}
    for i, hit in enumerate(hits):
        groups.setdefault(find(i), []).append(hit)
    return [groups[root] for root in sorted(groups)]


def _link_near_identical(session: Session, settings: Settings, hits: Sequence[Hit], union: Any) -> None:
    position = {hit.image_id: i for i, hit in enumerate(hits)}
    image_ids = list(position)
    rows = session.execute(select(m.Image.id, m.Image.sha256, m.Image.phash, m.Image.dhash)
                           .where(m.Image.id.in_(image_ids))).all()
    by_sha: dict[str, int] = {}
    hashed: list[tuple[int, int, int]] = []
    for image_id, sha, phash, dhash in rows:
        i = position[image_id]
        if sha:
            if sha in by_sha:
                union(by_sha[sha], i)
            else:
                by_sha[sha] = i
        if phash is not None and dhash is not None:
            hashed.append((i, phash & 0xFFFFFFFFFFFFFFFF, dhash & 0xFFFFFFFFFFFFFFFF))
    limit = settings.duplicate_max_distance
    for a in range(len(hashed)):
        for b in range(a + 1, len(hashed)):
            i, p1, d1 = hashed[a]
            j, p2, d2 = hashed[b]
            if (p1 ^ p2).bit_count() + (d1 ^ d2).bit_count() <= limit:
                union(i, j)
    flags = session.execute(select(m.Flag.image_id, m.Flag.evidence).where(
        m.Flag.image_id.in_(image_ids), m.Flag.kind == "duplicate_image",
        m.Flag.status.in_(("open", "claimed", "confirmed")))).all()
    for image_id, evidence in flags:
        other = (evidence or {}).get("first_upload", {}).get("image_id") if isinstance(evidence, dict) else None
        if image_id in position and isinstance(other, int) and other in position:
            union(position[image_id], position[other])
    vectors = dict(session.execute(select(m.SearchVector.id, m.SearchVector.vector).where(
        m.SearchVector.id.in_([h.vector_id for h in hits]))).all())
    if len(vectors) == len(hits):
        matrix = np.stack([decode(vectors[h.vector_id]) for h in hits])
        close = np.argwhere(np.triu(matrix @ matrix.T, 1) >= NEAR_IDENTICAL)
        for i, j in close:
            union(int(i), int(j))


def _results(session: Session, groups: Sequence[list[Hit]], query_tags: set[str]) -> list[Result]:
    if not groups:
        return []
    best = [group[0] for group in groups]
    listings = {row.id: row for row in session.execute(
        select(m.Listing).where(m.Listing.id.in_([h.listing_id for h in best]))).scalars()}
    urls = dict(session.execute(select(m.Image.id, m.Image.url).where(
        m.Image.id.in_([h.image_id for h in best]))).all())
    out = []
    for group, hit in zip(groups, best, strict=True):
        listing = listings[hit.listing_id]
        shared = [t for t in _tags(session, hit.image_id) if t in query_tags] if query_tags else []
        out.append(Result(listing_id=listing.id, external_id=listing.external_id, seller_id=listing.seller_id,
                          title=listing.title, category=listing.category, status=listing.status,
                          image_id=hit.image_id, image_url=urls.get(hit.image_id, ""),
                          score=round(float(hit.score), 4), why=shared,
                          collapsed=[h.image_id for h in group[1:]]))
    return out
