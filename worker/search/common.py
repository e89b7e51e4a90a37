"""What the index backends share: filters, hits, health, the embedded index's directory.

Import the public names from :mod:`worker.search.index`; this module exists so that the
backends (which ``index.open_index`` imports) need not import ``index``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, or_, select
from sqlalchemy.orm import Session

from db import models as m
from worker.config import Settings

#: Tag sources that name a catalog category (tagging step: taxonomy map or trained head).
CATEGORY_SOURCES = ("category-map", "category-head")
#: Listing statuses a query may ask for; ``deleted`` is never returned.
QUERY_STATUSES = ("pending", "processing", "done")


@dataclass(frozen=True)
class IndexFilters:
    """What a hit must satisfy besides being near. Empty tuples mean "no restriction".

    ``category`` matches the listing's declared category or a category tag of the image;
    ``object_label`` a detection label of the image; ``colour`` a colour tag of the image.
    ``model_version``: only vectors of this backbone (vectors of another are not comparable).
    """

    kind: str = "full"
    model_version: str | None = None
    dim: int | None = None
    exclude_image_ids: tuple[int, ...] = ()
    exclude_listing_ids: tuple[int, ...] = ()
    sellers: tuple[str, ...] = ()
    exclude_sellers: tuple[str, ...] = ()
    listing_statuses: tuple[str, ...] = QUERY_STATUSES
    category: str | None = None
    object_label: str | None = None
    colour: str | None = None


@dataclass(frozen=True)
class Hit:
    vector_id: int  # search_vectors.id
    image_id: int
    listing_id: int
    kind: str
    score: float  # cosine similarity, 1 = same direction


@dataclass
class IndexHealth:
    backend: str
    ok: bool
    detail: str
    counts: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def search_dir(settings: Settings) -> Path:
    return (settings.search_dir or settings.data_dir / "search").resolve()


# --- filters shared by both backends ------------------------------------------------------


def filter_conditions(filters: IndexFilters) -> list[ColumnElement[bool]]:
    """WHERE conditions over ``search_vectors`` joined to ``images`` and ``listings``."""
    sv, img, lst = m.SearchVector, m.Image, m.Listing
    statuses = tuple(s for s in filters.listing_statuses if s != "deleted") or QUERY_STATUSES
    conds: list[ColumnElement[bool]] = [
        sv.kind == filters.kind,
        img.status == "done",
        lst.status.in_(statuses),
    ]
    if filters.model_version is not None:
        conds.append(sv.model_version == filters.model_version)
    if filters.dim is not None:
        conds.append(sv.dim == filters.dim)
    if filters.exclude_image_ids:
        conds.append(sv.image_id.not_in(filters.exclude_image_ids))
    if filters.exclude_listing_ids:
        conds.append(sv.listing_id.not_in(filters.exclude_listing_ids))
    if filters.sellers:
        conds.append(lst.seller_id.in_(filters.sellers))
    if filters.exclude_sellers:
        conds.append(lst.seller_id.not_in(filters.exclude_sellers))
    if filters.category:
        conds.append(or_(lst.category == filters.category, exists().where(
            m.Tag.image_id == sv.image_id, m.Tag.name == filters.category,
            m.Tag.source.in_(CATEGORY_SOURCES))))
    if filters.object_label:
        conds.append(exists().where(m.Detection.image_id == sv.image_id,
                                    m.Detection.label == filters.object_label))
    if filters.colour:
        conds.append(exists().where(m.Tag.image_id == sv.image_id, m.Tag.name == filters.colour,
                                    m.Tag.source == "colour"))
    return conds


def passing(session: Session, vector_ids: Sequence[int], filters: IndexFilters) -> dict[int, tuple[int, int]]:
    """``search_vectors`` id -> (image id, listing id) of the ids among ``vector_ids`` that
    exist and pass ``filters``."""
    sv = m.SearchVector
    out: dict[int, tuple[int, int]] = {}
    ids = list(vector_ids)
    for start in range(0, len(ids), 5000):
        stmt = (select(sv.id, sv.image_id, sv.listing_id).join(m.Image, m.Image.id == sv.image_id)
                .join(m.Listing, m.Listing.id == sv.listing_id)
                .where(sv.id.in_(ids[start:start + 5000]), and_(*filter_conditions(filters))))
        out.update({int(r[0]): (int(r[1]), int(r[2])) for r in session.execute(stmt)})
    return out
