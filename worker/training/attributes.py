"""Attribute heads: the category head's mechanism, once per attribute name.

Attributes are what shoppers filter by besides colour (material, pattern, style...). Their
labels are ``labels`` rows of kind ``attribute``: ``name`` the attribute, ``value`` the class
(source review or import; a listing's label applies to each of its images unless the image has
its own). Each attribute with labels gets its own head ``attribute-head-<name>`` (a
``Linear(1280, n)`` on the stored embeddings, trained, compared and promoted exactly like the
category head); without a champion, the baseline is the majority class of the train split.
The tagging step then emits ``<name>:<value>`` tags with source ``attribute-head``.
"""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import models as m
from worker.steps.tagging import ATTRIBUTE_PREFIX

#: What a head's name (and so its folder and its tags) may contain.
_UNSAFE = re.compile(r"[^a-z0-9_]+")


def attribute_slug(name: str) -> str:
    """``"Sleeve length"`` -> ``"sleeve_length"``: safe as a folder name and a tag prefix."""
    return _UNSAFE.sub("_", name.strip().lower()).strip("_") or "attribute"


def model_name(attribute: str) -> str:
    return f"{ATTRIBUTE_PREFIX}{attribute_slug(attribute)}"


def attribute_targets(session: Session) -> dict[str, dict[int, tuple[str, str]]]:
    """attribute (slug) -> image id -> (value, split), from the active reviewed/imported
    attribute labels; an image's own label wins over its listing's."""
    rows = session.execute(
        select(m.Label.image_id, m.Label.listing_id, m.Label.name, m.Label.value, m.Label.split)
        .where(m.Label.kind == "attribute", m.Label.active.is_(True), m.Label.source.in_(("review", "import")),
               m.Label.name.is_not(None), m.Label.value.is_not(None))
        .order_by(m.Label.id)).all()
    listing_ids = {r.listing_id for r in rows if r.image_id is None and r.listing_id is not None}
    by_listing: dict[int, list[int]] = {}
    if listing_ids:
        for image_id, listing_id in session.execute(
                select(m.Image.id, m.Image.listing_id).where(m.Image.listing_id.in_(listing_ids))):
            by_listing.setdefault(listing_id, []).append(image_id)
    targets: dict[str, dict[int, tuple[str, str]]] = {}
    for own in (False, True):  # listing labels first, so an image's own label overwrites them
        for r in rows:
            if (r.image_id is not None) != own:
                continue
            images = [r.image_id] if own else by_listing.get(r.listing_id, [])
            for image_id in images:
                targets.setdefault(attribute_slug(r.name), {})[image_id] = (str(r.value), r.split)
    return dict(sorted(targets.items()))
