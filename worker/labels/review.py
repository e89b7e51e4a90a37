"""Reviewed labels: what a reviewer says about an image or listing, one ``labels`` row each.

The CLI (``catalog labels ...``), the HTTP review service and the bulk import call the same
functions. Each takes the caller's session and plain arguments, checks them against the
database, writes one row (``worker.labels.store.write``) and returns a ``LabelView``; bad input
raises a ``LabelError`` whose message is one sentence. The caller commits.

Each ``*_spec`` function only validates and describes the label; the import validates a whole
file with them before writing anything.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db import models as m
from worker.config import Settings, get_settings
from worker.labels.store import (
    Box,
    InvalidLabel,
    LabelError,
    LabelSpec,
    LabelView,
    UnknownCategory,
    UnknownTarget,
    check_box,
    write,
)

#: The taxonomy file the tagging step reads when ``CATALOG_TAXONOMY_PATH`` is unset.
DEFAULT_TAXONOMY = Path(__file__).resolve().parents[1] / "data" / "taxonomy.yaml"
CATEGORY_TAG_SOURCES = ("category-map", "category-head")
MAX_TEXT = 255


def heldout_percent(value: int | None = None, settings: Settings | None = None) -> int:
    """The held-out share to use: the argument, else the settings given, else the process's."""
    if value is not None:
        return value
    return (settings or get_settings()).label_heldout_percent


# --- shared checks -----------------------------------------------------------------------
def _text(value: str | None, what: str) -> str:
    text = (value or "").strip()
    if not text:
        raise InvalidLabel(f"the {what} is empty")
    if len(text) > MAX_TEXT:
        raise InvalidLabel(f"the {what} is longer than {MAX_TEXT} characters")
    return text


def _image(session: Session, image_id: int) -> m.Image:
    image = session.get(m.Image, image_id)
    if image is None:
        raise UnknownTarget(f"image {image_id} does not exist")
    listing = session.get_one(m.Listing, image.listing_id)
    if listing.status == "deleted":
        raise UnknownTarget(f"image {image_id} belongs to deleted listing {listing.external_id!r}")
    return image


def listing_by_external_id(session: Session, external_id: str) -> m.Listing:
    listing = session.execute(
        select(m.Listing).where(m.Listing.external_id == external_id)).scalar_one_or_none()
    if listing is None:
        raise UnknownTarget(f"listing {external_id!r} does not exist")
    if listing.status == "deleted":
        raise UnknownTarget(f"listing {external_id!r} was deleted")
    return listing


def _target(session: Session, image_id: int | None, listing_external_id: str | None
            ) -> tuple[m.Image | None, m.Listing]:
    if (image_id is None) == (listing_external_id is None):
        raise InvalidLabel("name either an image or a listing, not both or neither")
    if image_id is not None:
        image = _image(session, image_id)
        return image, session.get_one(m.Listing, image.listing_id)
    assert listing_external_id is not None
    return None, listing_by_external_id(session, listing_external_id)


def _tag_summary(tag: m.Tag) -> dict[str, Any]:
    return {"name": tag.name, "score": tag.score, "source": tag.source,
            "model_version": tag.model_version}


# --- tags --------------------------------------------------------------------------------
def tag_spec(session: Session, image_id: int, name: str, action: str, reviewer: str,
             *, source: str = "review", note: str | None = None) -> LabelSpec:
    """Confirm or reject a tag. Rejecting needs the model's tag on the image; confirming a tag
    the model did not give records it as a new positive label."""
    if action not in ("confirm", "reject"):
        raise InvalidLabel(f"a tag is confirmed or rejected, not {action!r}")
    image = _image(session, image_id)
    name = _text(name, "tag name")
    tag = session.execute(
        select(m.Tag).where(m.Tag.image_id == image.id, m.Tag.name == name)
        .order_by(m.Tag.id.desc()).limit(1)).scalar_one_or_none()
    if tag is None and action == "reject":
        shown = session.execute(select(m.Tag.name).where(m.Tag.image_id == image.id).distinct()).scalars()
        names = ", ".join(sorted(shown)) or "none"
        raise UnknownTarget(f"image {image_id} has no tag {name!r} to reject (its tags: {names})")
    return LabelSpec("tag", action, _text(reviewer, "reviewer"), source, image.id, None, name,
                     note=note, corrects_model_version=tag.model_version if tag else None,
                     model=_tag_summary(tag) if tag else None)


def confirm_tag(session: Session, image_id: int, name: str, reviewer: str, *, note: str | None = None,
                heldout: int | None = None) -> LabelView:
    """The image does show ``name``."""
    return write(session, tag_spec(session, image_id, name, "confirm", reviewer, note=note),
                 heldout_percent(heldout))


def reject_tag(session: Session, image_id: int, name: str, reviewer: str, *, note: str | None = None,
               heldout: int | None = None) -> LabelView:
    """The model's tag ``name`` is wrong for this image."""
    return write(session, tag_spec(session, image_id, name, "reject", reviewer, note=note),
                 heldout_percent(heldout))


# --- categories ----------------------------------------------------------------------------
def known_categories(session: Session, settings: Settings | None = None) -> set[str]:
    """The shop's category vocabulary: the taxonomy file's categories, the categories sellers
    declare and those of earlier category labels (a shop may have categories the taxonomy lacks)."""
    settings = settings or get_settings()
    path = settings.taxonomy_path or DEFAULT_TAXONOMY
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
        names = set((data.get("categories") or {}).keys())
    except (OSError, yaml.YAMLError, AttributeError):
        names = set()  # an unreadable taxonomy fails loudly in the tagging step, not here
    names |= set(session.execute(select(m.Listing.category).where(m.Listing.category.is_not(None))
                                 .distinct()).scalars())
    names |= set(session.execute(select(m.Label.name).where(m.Label.kind == "category",
                                                            m.Label.name.is_not(None)).distinct()).scalars())
    return {str(n) for n in names}


def check_category(category: str, known: set[str], new_category: bool) -> str:
    category = _text(category, "category")
    if category in known or new_category:
        return category
    close = difflib.get_close_matches(category, sorted(known), n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise UnknownCategory(f"unknown category {category!r}{hint}: it is not in the taxonomy, the "
                          "sellers' categories or earlier labels; allow it as a new category to add it")


def _model_category(session: Session, image_ids: list[int]) -> m.Tag | None:
    """The category the model gave (best score; for a listing, over all its images)."""
    if not image_ids:
        return None
    return session.execute(
        select(m.Tag).where(m.Tag.image_id.in_(image_ids), m.Tag.source.in_(CATEGORY_TAG_SOURCES))
        .order_by(m.Tag.score.desc(), m.Tag.id.desc()).limit(1)).scalar_one_or_none()


def category_spec(session: Session, category: str, reviewer: str, *, image_id: int | None = None,
                  listing_external_id: str | None = None, new_category: bool = False,
                  known: set[str] | None = None, source: str = "review",
                  note: str | None = None) -> LabelSpec:
    """The true category of one image, or of a whole listing."""
    image, listing = _target(session, image_id, listing_external_id)
    category = check_category(category, known if known is not None else known_categories(session),
                              new_category)
    ids = [image.id] if image is not None else list(session.execute(
        select(m.Image.id).where(m.Image.listing_id == listing.id)).scalars())
    tag = _model_category(session, ids)
    model: dict[str, Any] | None = _tag_summary(tag) if tag else None
    if image is None and listing.category:
        model = {**(model or {}), "seller_category": listing.category}
    return LabelSpec("category", "set", _text(reviewer, "reviewer"), source,
                     image.id if image else None, None if image else listing.id, category,
                     note=note, corrects_model_version=tag.model_version if tag else None, model=model)


def set_category(session: Session, category: str, reviewer: str, *, image_id: int | None = None,
                 listing_external_id: str | None = None, new_category: bool = False,
                 note: str | None = None, heldout: int | None = None) -> LabelView:
    """Record the true category of an image or (``listing_external_id``) of a listing. A
    category nobody used before needs ``new_category=True`` (typos are refused otherwise)."""
    spec = category_spec(session, category, reviewer, image_id=image_id,
                         listing_external_id=listing_external_id, new_category=new_category, note=note)
    return write(session, spec, heldout_percent(heldout))


# --- boxes ---------------------------------------------------------------------------------
def _detection(session: Session, detection_id: int, image_id: int | None) -> m.Detection:
    det = session.get(m.Detection, detection_id)
    if det is None:
        raise UnknownTarget(f"detection {detection_id} does not exist")
    if image_id is not None and det.image_id != image_id:
        raise UnknownTarget(f"detection {detection_id} belongs to image {det.image_id}, not {image_id}")
    return det


def _det_summary(det: m.Detection) -> dict[str, Any]:
    return {"label": det.label, "score": det.score, "box": [det.x0, det.y0, det.x1, det.y1],
            "model_version": det.model_version}


def box_spec(session: Session, action: str, reviewer: str, *, image_id: int | None = None,
             detection_id: int | None = None, label: str | None = None, box: Any = None,
             source: str = "review", note: str | None = None) -> LabelSpec:
    """``add`` a missing box (image, label, box), ``correct`` a detection's box (and maybe its
    label) or ``delete`` a wrong detection."""
    reviewer = _text(reviewer, "reviewer")
    if action == "add":
        if image_id is None:
            raise InvalidLabel("adding a box needs the image")
        if detection_id is not None:
            raise InvalidLabel("an added box is new: it takes no detection id (use correct)")
        image = _image(session, image_id)
        return LabelSpec("box", "add", reviewer, source, image.id, None, _text(label, "box label"),
                         box=check_box(box, image.width, image.height, image.id), note=note)
    if action not in ("correct", "delete"):
        raise InvalidLabel(f"a box is added, corrected or deleted, not {action!r}")
    if detection_id is None:
        raise InvalidLabel(f"to {action} a box, name the detection")
    det = _detection(session, detection_id, image_id)
    image = _image(session, det.image_id)
    checked: Box | None = None
    if action == "correct":
        if box is None:
            raise InvalidLabel("a corrected box needs its new coordinates x0 y0 x1 y1")
        checked = check_box(box, image.width, image.height, image.id)
    elif box is not None:
        raise InvalidLabel("a deleted box takes no coordinates")
    name = _text(label, "box label") if label else det.label
    return LabelSpec("box", action, reviewer, source, image.id, None, name, box=checked,
                     detection_id=det.id, note=note, corrects_model_version=det.model_version,
                     model=_det_summary(det))


def add_box(session: Session, image_id: int, label: str, box: Box, reviewer: str, *,
            note: str | None = None, heldout: int | None = None) -> LabelView:
    """A box the detector missed: ``label`` at ``box`` (x0 y0 x1 y1, original-image pixels)."""
    spec = box_spec(session, "add", reviewer, image_id=image_id, label=label, box=box, note=note)
    return write(session, spec, heldout_percent(heldout))


def correct_box(session: Session, detection_id: int, box: Box, reviewer: str, *,
                label: str | None = None, image_id: int | None = None, note: str | None = None,
                heldout: int | None = None) -> LabelView:
    """The detection is right about the object but its box (or, with ``label``, its class)
    is wrong. ``image_id``, when given, must be the detection's image."""
    spec = box_spec(session, "correct", reviewer, image_id=image_id, detection_id=detection_id,
                    label=label, box=box, note=note)
    return write(session, spec, heldout_percent(heldout))


def delete_box(session: Session, detection_id: int, reviewer: str, *, image_id: int | None = None,
               note: str | None = None, heldout: int | None = None) -> LabelView:
    """The detection shows nothing of its class: a false positive."""
    spec = box_spec(session, "delete", reviewer, image_id=image_id, detection_id=detection_id, note=note)
    return write(session, spec, heldout_percent(heldout))


# --- attributes ----------------------------------------------------------------------------
def attribute_spec(session: Session, name: str, value: str, reviewer: str, *,
                   image_id: int | None = None, listing_external_id: str | None = None,
                   source: str = "review", note: str | None = None) -> LabelSpec:
    """``name=value`` (e.g. material=leather) of an image or listing; names are lower-case."""
    image, listing = _target(session, image_id, listing_external_id)
    name = _text(name, "attribute name").lower()
    if "=" in name:
        raise InvalidLabel(f"attribute name {name!r} contains '='; give the name and the value apart")
    return LabelSpec("attribute", "set", _text(reviewer, "reviewer"), source,
                     image.id if image else None, None if image else listing.id, name,
                     _text(value, f"value of attribute {name!r}"), note=note)


def set_attribute(session: Session, name: str, value: str, reviewer: str, *,
                  image_id: int | None = None, listing_external_id: str | None = None,
                  note: str | None = None, heldout: int | None = None) -> LabelView:
    """Record an attribute shoppers filter by (material, pattern, style...)."""
    spec = attribute_spec(session, name, value, reviewer, image_id=image_id,
                          listing_external_id=listing_external_id, note=note)
    return write(session, spec, heldout_percent(heldout))


# --- flag verdicts -------------------------------------------------------------------------
def record_flag_verdict(session: Session, flag_id: int, verdict: str, reviewer: str, *,
                        note: str | None = None, heldout: int | None = None) -> LabelView:
    """The label of a resolved fraud flag (``worker.review.queue.resolve_flag`` calls this):
    ``confirmed`` -> action confirm, ``dismissed`` -> reject; ``name`` is the flag kind."""
    actions = {"confirmed": "confirm", "dismissed": "reject"}
    if verdict not in actions:
        raise InvalidLabel(f"a flag verdict is confirmed or dismissed, not {verdict!r}")
    flag = session.get(m.Flag, flag_id)
    if flag is None:
        raise UnknownTarget(f"flag {flag_id} does not exist")
    spec = LabelSpec("flag_verdict", actions[verdict], _text(reviewer, "reviewer"), "review",
                     flag.image_id, None if flag.image_id else flag.listing_id, flag.kind, verdict,
                     flag_id=flag.id, note=note, corrects_model_version=flag.model_version,
                     model={"kind": flag.kind, "score": flag.score})
    return write(session, spec, heldout_percent(heldout))


def label_history(session: Session, *, image_id: int | None = None,
                  listing_id: int | None = None) -> list[LabelView]:
    """Every label of an image or listing, active and superseded, oldest first."""
    if (image_id is None) == (listing_id is None):
        raise InvalidLabel("name either an image or a listing")
    column = m.Label.image_id if image_id is not None else m.Label.listing_id
    wanted = image_id if image_id is not None else listing_id
    rows = session.execute(select(m.Label).where(column == wanted).order_by(m.Label.id)).scalars()
    return [LabelView.of(r) for r in rows]


def count_active(session: Session) -> int:
    return int(session.execute(select(func.count()).select_from(m.Label)
                               .where(m.Label.active.is_(True))).scalar_one())


__all__ = ["LabelError", "LabelView", "add_box", "confirm_tag", "correct_box", "delete_box",
           "label_history", "record_flag_verdict", "reject_tag", "set_attribute", "set_category"]
