"""Read-side of the labels: counts for ``catalog labels stats`` and the sellers' weak labels.

Sellers' declared categories (``listings.category``) are weak labels: a seller may pick the
wrong category by mistake or on purpose (that is what the category-mismatch check looks for),
so they are never stored as reviewed labels and never decide a promotion. They are returned
here, apart and marked ``source="seller"``, for reporting and as a prior.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db import models as m


@dataclass(frozen=True)
class WeakLabel:
    """A category a seller declared for a listing: weak, unreviewed."""

    listing_id: int
    listing_external_id: str
    category: str
    source: str = "seller"


def weak_category_labels(session: Session) -> list[WeakLabel]:
    """The sellers' declared categories of listings that are not deleted, by listing id."""
    rows = session.execute(
        select(m.Listing.id, m.Listing.external_id, m.Listing.category)
        .where(m.Listing.category.is_not(None), m.Listing.category != "", m.Listing.status != "deleted")
        .order_by(m.Listing.id)).all()
    return [WeakLabel(lid, ext, str(cat)) for lid, ext, cat in rows]


@dataclass(frozen=True)
class LabelStats:
    """Active labels by kind, split and source; how many were superseded; weak labels apart."""

    active: int
    superseded: int
    by_kind: dict[str, dict[str, int]]  # kind -> {"train": n, "heldout": n}
    by_source: dict[str, int]
    by_action: dict[str, int]  # "kind/action" -> n
    reviewers: int
    categories: dict[str, dict[str, int]]  # active category labels: name -> {"train", "heldout"}
    weak_categories: int

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def label_stats(session: Session) -> LabelStats:
    active = m.Label.active.is_(True)
    by_kind: dict[str, dict[str, int]] = {}
    for kind, split, n in session.execute(
            select(m.Label.kind, m.Label.split, func.count()).where(active)
            .group_by(m.Label.kind, m.Label.split)):
        by_kind.setdefault(kind, {"train": 0, "heldout": 0})[split] = n
    by_source = dict(session.execute(select(m.Label.source, func.count()).where(active)
                                     .group_by(m.Label.source)).all())
    by_action = {f"{k}/{a}": n for k, a, n in session.execute(
        select(m.Label.kind, m.Label.action, func.count()).where(active)
        .group_by(m.Label.kind, m.Label.action))}
    categories: dict[str, dict[str, int]] = {}
    for name, split, n in session.execute(
            select(m.Label.name, m.Label.split, func.count())
            .where(active, m.Label.kind == "category").group_by(m.Label.name, m.Label.split)):
        categories.setdefault(str(name), {"train": 0, "heldout": 0})[split] = n
    total = dict(session.execute(select(m.Label.active, func.count()).group_by(m.Label.active))
                 .all())
    reviewers = session.execute(select(func.count(func.distinct(m.Label.reviewer)))).scalar_one()
    weak = session.execute(select(func.count()).select_from(m.Listing).where(
        m.Listing.category.is_not(None), m.Listing.category != "", m.Listing.status != "deleted")).scalar_one()
    return LabelStats(int(total.get(True, 0)), int(total.get(False, 0)), by_kind, by_source,
                      by_action, int(reviewers), dict(sorted(categories.items())), int(weak))
