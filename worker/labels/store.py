"""How a label row is written: the fixed train/held-out split, supersession, history.

Every public function of ``worker.labels`` ends here. A label is described first as a
``LabelSpec`` (validated against the database by ``worker.labels.review``), then ``write``
turns it into one ``labels`` row: the active label it replaces (same target, kind and key)
is switched off, never deleted, and the new row records what it replaced in ``previous``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from db import models as m

KINDS = ("tag", "category", "box", "attribute", "flag_verdict")
ACTIONS = {
    "tag": ("confirm", "reject"),
    "category": ("set",),
    "attribute": ("set",),
    "box": ("add", "correct", "delete"),
    "flag_verdict": ("confirm", "reject"),
}
#: Where a stored label came from. Sellers' declared categories (``seller``) are weak labels and
#: are never stored (see ``worker.labels.summary.weak_category_labels``).
SOURCES = ("review", "import")
TRAIN, HELDOUT = "train", "heldout"

Box = tuple[float, float, float, float]


class LabelError(Exception):
    """A label was refused; the message is one sentence a reviewer can act on."""


class UnknownTarget(LabelError):
    """The image, listing, tag, detection or flag named does not exist (or was deleted)."""


class InvalidLabel(LabelError):
    """The label itself is malformed: bad kind/action, empty name, box outside the image, ..."""


class UnknownCategory(LabelError):
    """A category that neither the taxonomy, the sellers nor earlier labels know."""


def split_for(image_id: int | None, listing_id: int | None, heldout_percent: int) -> str:
    """The split of a new label's target: ``sha256(str(image_id))`` (image labels) or
    ``sha256("listing:" + str(listing_id))`` (listing labels), first 8 bytes big-endian,
    mod 100, below ``heldout_percent`` -> held out. Pure, so anyone can recompute it."""
    if not 0 <= heldout_percent <= 100:
        raise InvalidLabel(f"the held-out share must be 0-100 percent, not {heldout_percent}")
    if image_id is not None:
        text = str(image_id)
    elif listing_id is not None:
        text = f"listing:{listing_id}"
    else:
        raise InvalidLabel("a label needs an image or a listing")
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % 100
    return HELDOUT if bucket < heldout_percent else TRAIN


@dataclass(frozen=True)
class LabelSpec:
    """A label about to be written, already checked against the database."""

    kind: str
    action: str
    reviewer: str
    source: str = "review"
    image_id: int | None = None
    listing_id: int | None = None
    name: str | None = None
    value: str | None = None
    box: Box | None = None
    detection_id: int | None = None
    flag_id: int | None = None
    note: str | None = None
    corrects_model_version: str | None = None
    #: What the model (or the seller) said before this label: the ``model`` part of ``previous``.
    model: dict[str, Any] | None = None

    def key(self) -> tuple[Any, ...]:
        """Labels with equal keys are about the same thing: the newer supersedes the older.
        A category is one per target whatever its name; an added box is its own thing."""
        target = (self.image_id, self.listing_id)
        if self.kind == "category":
            return ("category", *target)
        if self.kind == "box" and self.detection_id is not None:
            return ("box", self.detection_id)
        if self.kind == "box":
            return ("box-add", *target, self.name, _rounded(self.box))
        if self.kind == "flag_verdict":
            return ("flag_verdict", self.flag_id)
        return (self.kind, *target, self.name)

    def same_content(self, row: m.Label) -> bool:
        """True when ``row`` already says exactly this (an import of it changes nothing)."""
        box = _rounded((row.x0, row.y0, row.x1, row.y1)) if row.x0 is not None else None
        return (row.action, row.name, row.value, box) == (self.action, self.name, self.value,
                                                          _rounded(self.box))


def _rounded(box: tuple[Any, ...] | None) -> tuple[float, ...] | None:
    return tuple(round(float(v), 1) for v in box) if box is not None else None


@dataclass(frozen=True)
class LabelView:
    """A stored label as plain data (safe to use after the session closes)."""

    id: int
    kind: str
    action: str
    image_id: int | None
    listing_id: int | None
    name: str | None
    value: str | None
    box: Box | None
    detection_id: int | None
    flag_id: int | None
    source: str
    reviewer: str
    corrects_model_version: str | None
    previous: dict[str, Any] | None
    split: str
    active: bool
    note: str | None
    created_at: datetime | None
    superseded: tuple[int, ...] = field(default=())

    @classmethod
    def of(cls, row: m.Label, superseded: tuple[int, ...] = ()) -> LabelView:
        box = (row.x0, row.y0, row.x1, row.y1) if row.x0 is not None else None
        created = row.created_at
        if created is not None and created.tzinfo is None:
            created = created.replace(tzinfo=UTC)  # SQLite hands back naive UTC times
        return cls(row.id, row.kind, row.action, row.image_id, row.listing_id, row.name, row.value,
                   box, row.detection_id, row.flag_id, row.source, row.reviewer,  # type: ignore[arg-type]
                   row.corrects_model_version, row.previous, row.split, row.active, row.note,
                   created, superseded)

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["box"] = list(self.box) if self.box else None
        out["superseded"] = list(self.superseded)
        out["created_at"] = self.created_at.isoformat() if self.created_at else None
        return out


def check_box(box: Any, width: int | None, height: int | None, image_id: int) -> Box:
    """Four finite numbers x0 < x1, y0 < y1 inside the image's pixels (half a pixel of slack
    for rounding), or an ``InvalidLabel`` that says what is wrong."""
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        raise InvalidLabel(f"a box is four numbers x0 y0 x1 y1, not {box!r}") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise InvalidLabel(f"a box is four finite numbers x0 y0 x1 y1, not {box!r}")
    x0, y0, x1, y1 = values
    if not (x0 < x1 and y0 < y1):
        raise InvalidLabel(f"box {_fmt(values)} is empty: it needs x0 < x1 and y0 < y1")
    if width is None or height is None:
        raise InvalidLabel(f"image {image_id} has no known size yet (not analysed), so a box "
                           "on it cannot be checked")
    if x0 < -0.5 or y0 < -0.5 or x1 > width + 0.5 or y1 > height + 0.5:
        raise InvalidLabel(f"box {_fmt(values)} is outside image {image_id} "
                           f"({width}x{height} pixels)")
    return (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))


def _fmt(box: tuple[float, ...]) -> str:
    return "(" + " ".join(f"{v:g}" for v in box) + ")"


def active_labels(session: Session, spec: LabelSpec) -> list[m.Label]:
    """The active labels ``spec`` would supersede (normally at most one)."""
    stmt = select(m.Label).where(m.Label.active.is_(True), m.Label.kind == spec.kind)
    if spec.kind == "flag_verdict":
        stmt = stmt.where(m.Label.flag_id == spec.flag_id)
    elif spec.kind == "box" and spec.detection_id is not None:
        stmt = stmt.where(m.Label.detection_id == spec.detection_id)
    else:
        stmt = stmt.where(_is(m.Label.image_id, spec.image_id), _is(m.Label.listing_id, spec.listing_id))
        if spec.kind == "box":
            stmt = stmt.where(m.Label.detection_id.is_(None), m.Label.name == spec.name)
        elif spec.kind != "category":
            stmt = stmt.where(m.Label.name == spec.name)
    rows = list(session.execute(stmt.order_by(m.Label.id)).scalars())
    if spec.kind == "box" and spec.detection_id is None:
        rows = [r for r in rows if _rounded((r.x0, r.y0, r.x1, r.y1)) == _rounded(spec.box)]
    return rows


def _is(column: Any, value: int | None) -> Any:
    return column.is_(None) if value is None else column == value


def existing_split(session: Session, image_id: int | None, listing_id: int | None) -> str | None:
    """The split earlier labels of this target got: a target stays in one split for good,
    even if ``CATALOG_LABEL_HELDOUT_PERCENT`` changes later."""
    stmt = select(m.Label.split)
    if image_id is not None:
        stmt = stmt.where(m.Label.image_id == image_id)
    else:
        stmt = stmt.where(m.Label.listing_id == listing_id, m.Label.image_id.is_(None))
    return session.execute(stmt.order_by(m.Label.id).limit(1)).scalar_one_or_none()


def _summary(row: m.Label) -> dict[str, Any]:
    box = [row.x0, row.y0, row.x1, row.y1] if row.x0 is not None else None
    created = row.created_at.isoformat() if row.created_at else None
    return {"id": row.id, "action": row.action, "name": row.name, "value": row.value, "box": box,
            "reviewer": row.reviewer, "source": row.source, "created_at": created}


def begin_write(session: Session) -> None:
    """SQLite: take the database's write lock now, before reading the labels to supersede.
    Its driver begins a transaction only at the first write, so two writers could otherwise
    both read the same active label and both insert a successor. A write matching no row is
    enough (and touches no ``updated_at``). Postgres: nothing, the row locks do it."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(text("UPDATE labels SET active = active WHERE id = -1"))


def lock_target(session: Session, spec: LabelSpec) -> None:
    """Serialise labels of one target (Postgres row lock; SQLite has one writer anyway), so two
    reviewers at once never leave two active labels. Flag verdicts are serialised by the flag
    lock ``resolve_flag`` holds; taking the image after it would break the lock order."""
    if spec.kind == "flag_verdict":
        return
    begin_write(session)
    if spec.image_id is not None:
        session.execute(select(m.Image.id).where(m.Image.id == spec.image_id).with_for_update())
    elif spec.listing_id is not None:
        session.execute(select(m.Listing.id).where(m.Listing.id == spec.listing_id).with_for_update())


def write(session: Session, spec: LabelSpec, heldout_percent: int,
          now: datetime | None = None) -> LabelView:
    """Insert ``spec`` as the active label of its key; older active ones become history."""
    if spec.kind not in KINDS or spec.action not in ACTIONS[spec.kind]:
        raise InvalidLabel(f"{spec.kind!r} labels take the actions {', '.join(ACTIONS.get(spec.kind, ()))}, "
                           f"not {spec.action!r}")
    if spec.source not in SOURCES:
        raise InvalidLabel(f"label source must be one of {', '.join(SOURCES)}, not {spec.source!r}")
    lock_target(session, spec)
    older = active_labels(session, spec)
    for row in older:
        row.active = False
    previous: dict[str, Any] | None = None
    if spec.model is not None or older:
        previous = {"model": spec.model, "label": _summary(older[-1]) if older else None}
    split = existing_split(session, spec.image_id, spec.listing_id) or split_for(
        spec.image_id, spec.listing_id, heldout_percent)
    x0, y0, x1, y1 = spec.box if spec.box is not None else (None, None, None, None)
    row = m.Label(image_id=spec.image_id, listing_id=spec.listing_id, kind=spec.kind,
                  action=spec.action, name=spec.name, value=spec.value, x0=x0, y0=y0, x1=x1, y1=y1,
                  detection_id=spec.detection_id, flag_id=spec.flag_id, source=spec.source,
                  reviewer=spec.reviewer, corrects_model_version=spec.corrects_model_version,
                  previous=previous, split=split, active=True, note=spec.note,
                  created_at=now or datetime.now(UTC))
    # The old rows must be switched off before the new one exists, whatever order the flush picks.
    session.flush()
    session.add(row)
    session.flush()
    return LabelView.of(row, tuple(r.id for r in older))


def with_source(spec: LabelSpec, source: str | None, reviewer: str | None) -> LabelSpec:
    return replace(spec, source=source or spec.source, reviewer=reviewer or spec.reviewer)
