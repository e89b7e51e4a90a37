"""Seeding a catalogue of labelled embeddings and flag verdicts for the retraining tests."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np

from db import models as m
from db.session import transaction
from worker.labels.store import split_for

CATEGORIES = ("bags", "shoes", "watches", "vinyl-records")  # the last one is not in the taxonomy


BACKBONE = "efficientnet-lite0-imagenet@0123abcd"


@dataclass
class Seeded:
    url: str
    images: dict[int, str]  # image id -> true category
    heldout: int


def seed_catalogue(url: str, *, per_class: int = 40, zero_shot_right: float = 0.5, noise: float = 0.9,
                   heldout_percent: int = 30, seed: int = 0) -> Seeded:
    """``per_class`` processed images per category, each with an embedding, a category-map tag
    (right with probability ``zero_shot_right``) and a reviewed category label."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(CATEGORIES), 1280))
    images: dict[int, str] = {}
    heldout = 0
    with transaction(url) as s:
        for k, category in enumerate(CATEGORIES):
            for _ in range(per_class):
                listing = m.Listing(external_id=f"l-{uuid.uuid4().hex[:10]}", seller_id="s", title="",
                                    status="done")
                s.add(listing)
                s.flush()
                image = m.Image(listing_id=listing.id, url="https://img.example/x.jpg", status="done")
                s.add(image)
                s.flush()
                vec = centres[k] / np.linalg.norm(centres[k]) + noise * rng.normal(size=1280) / np.sqrt(1280)
                vec = (vec / np.linalg.norm(vec)).astype("<f4")
                s.add(m.Embedding(image_id=image.id, model_version=BACKBONE, dim=1280, vector=vec.tobytes()))
                guess = category if rng.random() < zero_shot_right and category in CATEGORIES[:3] \
                    else CATEGORIES[int(rng.integers(0, 3))]
                s.add(m.Tag(listing_id=listing.id, image_id=image.id, name=guess, score=0.6,
                            source="category-map", model_version=BACKBONE))
                split = split_for(image.id, None, heldout_percent)
                heldout += split == "heldout"
                s.add(m.Label(image_id=image.id, kind="category", action="set", name=category, source="review",
                              reviewer="alice", split=split, corrects_model_version=BACKBONE))
                images[image.id] = category
    return Seeded(url, images, heldout)


def seed_verdicts(url: str, *, n: int = 300, seed: int = 0, heldout_percent: int = 30) -> None:
    """Flags whose true confirm rate per kind differs from the fixed weights: contact_info flags
    are nearly always real, duplicate_image ones rarely."""
    rng = np.random.default_rng(seed)
    truth = {"contact_info": 0.95, "duplicate_image": 0.15, "low_quality": 0.5}
    with transaction(url) as s:
        listing = m.Listing(external_id=f"f-{uuid.uuid4().hex[:10]}", seller_id="s", title="", status="done")
        s.add(listing)
        s.flush()
        for i in range(n):
            kind = list(truth)[i % len(truth)]
            score = float(rng.uniform(0.6, 1.0))
            image = m.Image(listing_id=listing.id, position=i, url="https://img.example/f.jpg", status="done")
            s.add(image)
            s.flush()
            flag = m.Flag(listing_id=listing.id, image_id=image.id, kind=kind, score=score, evidence={},
                          model_version="fraud-test")
            s.add(flag)
            s.flush()
            confirmed = rng.random() < truth[kind] * score
            s.add(m.Label(image_id=image.id, kind="flag_verdict", action="confirm" if confirmed else "reject",
                          name=kind, value="confirmed" if confirmed else "dismissed", flag_id=flag.id,
                          source="review", reviewer="bob", split=split_for(image.id, None, heldout_percent)))


#: The material of each seeded category: an attribute the embeddings' clusters make learnable.
MATERIAL = {"bags": "leather", "shoes": "canvas", "watches": "metal", "vinyl-records": "vinyl"}


def seed_attribute_labels(url: str, images: dict[int, str], *, name: str = "material",
                          heldout_percent: int = 30) -> None:
    """One reviewed ``attribute`` label per seeded image: ``name`` = MATERIAL[its category]."""
    with transaction(url) as s:
        for image_id, category in images.items():
            s.add(m.Label(image_id=image_id, kind="attribute", action="set", name=name, value=MATERIAL[category],
                          source="import", reviewer="shop", split=split_for(image_id, None, heldout_percent)))
