"""Search for users: analyse one photo, tag search, and visual search ("more like this").

* ``POST /api/v1/analyze`` -- category, tags, colours and boxes of an uploaded photo, no
  listing created and nothing stored;
* ``GET /api/v1/search?q=`` -- listings whose tags match the words (English or zh-CN);
* ``GET /api/v1/listings/{id}/similar`` and ``POST /api/v1/search/image`` -- listings that look
  like a stored listing or an uploaded photo (``worker.search.similar``).

Uploads have the limits of listing photos (``CATALOG_FETCH_MAX_BYTES``,
``CATALOG_MAX_PIXELS``, sniffed formats) and, because each one runs the models, a per-user
rate (``CATALOG_ANALYZE_RATE_PER_MINUTE``, 429 with ``Retry-After``). Every refusal is one
sentence in ``detail`` and changes nothing in the database. The models run in the server's
thread pool, with no database session open.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from worker.api.deps import Reviewer, state, tx
from worker.config import Settings
from worker.io.errors import ImageLoadError
from worker.search.analyze import Analysis, AnalyzeError, analyze_photo, decode_upload
from worker.search.errors import SearchError
from worker.search.index import QUERY_STATUSES
from worker.search.similar import SimilarQuery, similar, vector_for_listing
from worker.search.tags import MAX_K, SearchQueryError, search_tags

router = APIRouter(prefix="/api/v1", tags=["search"])

#: The multipart field that carries the photo (a raw image body works too).
PHOTO_FIELD = "photo"
#: Room for the multipart envelope around the largest photo accepted (the body limit of the
#: upload routes is CATALOG_FETCH_MAX_BYTES plus this).
MULTIPART_OVERHEAD = 64 * 1024
UPLOAD_PATHS = ("/api/v1/analyze", "/api/v1/search/image")
#: ImageLoadError codes that mean "too big" (413); every other refusal of an upload is 400.
TOO_LARGE = frozenset({"too_large", "too_many_pixels", "decompression_bomb"})

UPLOAD_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": [PHOTO_FIELD], "properties": {
        PHOTO_FIELD: {"type": "string", "format": "binary",
                      "description": "the photo: JPEG, PNG, WEBP, GIF, BMP or TIFF"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
}}}
UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "not an image (or a broken or unsupported one), or no photo in the request"},
    413: {"description": "larger than CATALOG_FETCH_MAX_BYTES or CATALOG_MAX_PIXELS"},
    429: {"description": "more than CATALOG_ANALYZE_RATE_PER_MINUTE photos this minute; see Retry-After"},
}


def upload_body_limit(settings: Settings) -> int:
    """The request-body limit of :data:`UPLOAD_PATHS` (``worker.api.app.BodyLimit``)."""
    return settings.fetch_max_bytes + MULTIPART_OVERHEAD


class RateLimiter:
    """At most ``per_minute`` requests per key in any 60 s (sliding window); in memory, per
    process, like the login limit."""

    WINDOW = 60.0

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str, now: float | None = None) -> float | None:
        """Count one request of ``key``; None when allowed, else the seconds until one is."""
        if self.per_minute <= 0:
            return None
        now = time.monotonic() if now is None else now
        with self._lock:
            times = self._seen.setdefault(key, deque())
            while times and times[0] <= now - self.WINDOW:
                times.popleft()
            if len(times) >= self.per_minute:
                return times[0] + self.WINDOW - now
            times.append(now)
            return None


_limiter_lock = threading.Lock()


def limiter(request: Request) -> RateLimiter:
    """The service's limiter (one per app, made on first use)."""
    with _limiter_lock:
        found = getattr(request.app.state, "analyze_limiter", None)
        if not isinstance(found, RateLimiter):
            found = RateLimiter(state(request).settings.analyze_rate_per_minute)
            request.app.state.analyze_limiter = found
        return found


def _rate_limit(request: Request, who: Any) -> None:
    wait = limiter(request).take(f"user:{who.name}")
    if wait is not None:
        seconds = max(1, math.ceil(wait))
        per_minute = state(request).settings.analyze_rate_per_minute
        raise HTTPException(429, f"at most {per_minute} photos a minute may be analysed per user "
                            f"(CATALOG_ANALYZE_RATE_PER_MINUTE); try again in {seconds} s",
                            headers={"Retry-After": str(seconds)})


async def read_photo(request: Request, settings: Settings) -> bytes:
    """The uploaded photo's bytes: the multipart field ``photo``, or the raw body."""
    limit = settings.fetch_max_bytes
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=20)
        part = form.get(PHOTO_FIELD)
        if not isinstance(part, UploadFile):
            raise HTTPException(400, f"send the photo as the multipart/form-data file field {PHOTO_FIELD!r} "
                                "(or as the raw request body)")
        data = await part.read(limit + 1)
    else:
        data = await request.body()
    if not data:
        raise HTTPException(400, f"the request carries no photo: send it as the multipart/form-data file "
                            f"field {PHOTO_FIELD!r} or as the raw request body")
    if len(data) > limit:
        raise HTTPException(413, f"the photo is larger than the {limit} bytes accepted (CATALOG_FETCH_MAX_BYTES)")
    return data


def load_error(exc: ImageLoadError) -> HTTPException:
    return HTTPException(413 if exc.code in TOO_LARGE else 400, str(exc))


async def analysed_upload(request: Request, who: Any) -> Analysis:
    """Rate limit, read, decode and analyse the uploaded photo (models in the thread pool)."""
    settings = state(request).settings
    _rate_limit(request, who)
    data = await read_photo(request, settings)
    try:
        photo = await run_in_threadpool(decode_upload, data, settings, "the photo")
    except ImageLoadError as exc:
        raise load_error(exc) from None
    return await run_in_threadpool(analyze_photo, photo, settings)


@router.post("/analyze", summary="Analyse one photo: category, tags, colours, boxes (nothing is stored)",
             openapi_extra=UPLOAD_BODY, responses=UPLOAD_ERRORS)
async def analyze(request: Request, who: Reviewer) -> dict[str, Any]:
    """Runs the configured describing steps (tagging, detection, segmentation) on the photo, as
    the worker does for a listing photo, and returns what they found; no listing is created and
    nothing is written. ``names`` give each tag's name in the taxonomy's other languages
    (zh-CN). A step whose model is missing is listed with status ``unavailable``."""
    return (await analysed_upload(request, who)).to_dict()


@router.get("/search", summary="Listings whose tags match the words of q (English or zh-CN)")
def search(request: Request, who: Reviewer,
           q: Annotated[str, Query(description='words, e.g. "red cup" or "红色杯子"', max_length=1000)],
           k: Annotated[int, Query(description=f"how many listings, 1-{MAX_K}")] = 10,
           category: Annotated[str | None, Query(description="only listings declared or "
                                                 "categorised so (English or zh-CN name)")] = None,
           ) -> dict[str, Any]:
    """Ranks listings by how many terms of ``q`` their photos' tags match (ImageNet labels,
    categories, detection labels, colours, attribute values), then by the tags' scores; each
    hit says which tag matched which term. Deleted listings and failed photos never match."""
    try:
        with tx(request) as session:
            return search_tags(session, state(request).settings, q, k=k, category=category).to_dict()
    except SearchQueryError as exc:
        raise HTTPException(422, str(exc)) from None


# --- visual search ------------------------------------------------------------------------------


def _check_k(k: int) -> None:
    if not 1 <= k <= MAX_K:
        raise HTTPException(422, f"k must be a whole number from 1 to {MAX_K}, not {k}")


def _search_error(exc: SearchError) -> HTTPException:
    return HTTPException(exc.status, str(exc))


K = Annotated[int, Query(description=f"how many listings, 1-{MAX_K}")]
Category = Annotated[str | None, Query(description="only listings declared or categorised so")]
Label = Annotated[str | None, Query(description="only photos with this detected object (e.g. cup)")]
Colour = Annotated[str | None, Query(description="only photos with this colour tag (e.g. red)")]
Sellers = Annotated[list[str] | None, Query(description="only these sellers (repeat the parameter)")]
ExcludeSellers = Annotated[list[str] | None, Query(description="leave these sellers out (repeatable)")]
Statuses = Annotated[list[str] | None, Query(description=f"only listings in these statuses: "
                                             f"{', '.join(QUERY_STATUSES)} (default all; deleted never)")]
Kind = Annotated[str | None, Query(description="region (the product) or full (the whole photo); default "
                                   "CATALOG_SEARCH_EMBEDDING")]
SIMILAR_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such listing, or it was deleted"},
    409: {"description": "the listing's photos failed analysis, are not analysed yet, or have no vector"},
    422: {"description": "k out of range, or a bad filter"},
    503: {"description": "visual search is switched off or its index cannot be used"},
}


def _options(k: int, category: str | None, label: str | None, colour: str | None, seller: list[str] | None,
             exclude_seller: list[str] | None, status: list[str] | None, kind: str | None,
             include_own_seller: bool = False) -> dict[str, Any]:
    _check_k(k)
    bad = [s for s in status or () if s not in QUERY_STATUSES]
    if bad:
        raise HTTPException(422, f"status must be among {', '.join(QUERY_STATUSES)}, not {', '.join(bad)}")
    if kind is not None and kind not in ("region", "full"):
        raise HTTPException(422, f"kind must be region or full, not {kind!r}")
    return {"k": k, "category": category, "object_label": label, "colour": colour,
            "sellers": tuple(seller or ()), "exclude_sellers": tuple(exclude_seller or ()),
            "include_own_seller": include_own_seller, **({"statuses": tuple(status)} if status else {})}


@router.get("/listings/{external_id}/similar", responses=SIMILAR_ERRORS,
            summary="Listings of other sellers whose photos look like this listing's")
def listing_similar(request: Request, who: Reviewer, external_id: str, k: K = 10, category: Category = None,
                    label: Label = None, colour: Colour = None, seller: Sellers = None,
                    exclude_seller: ExcludeSellers = None, status: Statuses = None, kind: Kind = None,
                    include_own_seller: Annotated[bool, Query(description="also this listing's own seller")] = False,
                    ) -> dict[str, Any]:
    """"More like this": the listing's first analysed photo is the query. One result per listing
    (its best photo), near-identical photos folded into one result (``collapsed``), the query
    listing's seller left out unless ``include_own_seller``; ``score`` is the cosine similarity
    and ``why`` the tags shared with the query photo."""
    options = _options(k, category, label, colour, seller, exclude_seller, status, kind, include_own_seller)
    settings = state(request).settings
    try:
        with tx(request) as session:
            qv = vector_for_listing(session, settings, external_id, kind)
            results = similar(session, settings, SimilarQuery.from_vector(qv, **options))
    except SearchError as exc:
        raise _search_error(exc) from None
    return {"query": {"listing": external_id, "image_id": qv.image_id, "seller_id": qv.seller_id, "kind": qv.kind},
            "results": [r.as_dict() for r in results]}


@router.post("/search/image", summary="Listings whose photos look like an uploaded photo",
             openapi_extra=UPLOAD_BODY, responses={**UPLOAD_ERRORS, **{
                 422: {"description": "k out of range, a bad filter, or no search vector could be computed"},
                 503: SIMILAR_ERRORS[503]}})
async def search_image(request: Request, who: Reviewer, k: K = 10, category: Category = None, label: Label = None,
                       colour: Colour = None, seller: Sellers = None, exclude_seller: ExcludeSellers = None,
                       status: Statuses = None, kind: Kind = None) -> dict[str, Any]:
    """Search by photo: the upload is analysed like a listing photo (same limits, same models,
    nothing stored, rate-limited like ``/analyze``) and its product-region vector (or the
    whole photo's, ``kind=full``) is searched. The answer carries the analysis too."""
    options = _options(k, category, label, colour, seller, exclude_seller, status, kind)
    settings = state(request).settings
    if settings.search_backend == "off":  # say so before the models run
        raise HTTPException(503, "Visual search is switched off (CATALOG_SEARCH_BACKEND=off).")
    analysis = await analysed_upload(request, who)
    try:
        vector, version = analysis.vector(kind or settings.search_embedding)
    except AnalyzeError as exc:
        raise HTTPException(422, str(exc)) from None
    tags = tuple(dict.fromkeys([t["name"] for t in analysis.tags] + [b["label"] for b in analysis.boxes]))
    query = SimilarQuery(vector=vector, kind=kind, model_version=version, query_tags=tags, **options)

    def run() -> list[Any]:
        with tx(request) as session:
            return similar(session, settings, query)

    try:
        results = await run_in_threadpool(run)
    except SearchError as exc:
        raise _search_error(exc) from None
    return {"query": {"photo": analysis.to_dict(), "kind": kind or settings.search_embedding},
            "results": [r.as_dict() for r in results]}
