"""Seeding a catalogue of labelled embeddings and flag verdicts for the retraining tests."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psycopg2
from PIL import Image, ImageEnhance, ImageOps

from db import models as m
from db.session import transaction
from worker.config import Settings
from worker.labels.store import split_for
from worker.steps.tagging import TaggingStep, categoriser, tagging_model

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


# --- real photos (scikit-image's bundled data), for the acceptance tests -------------------


def photo_dir() -> Path:
    """scikit-image's bundled photos (callers skip when scikit-image is not installed)."""
    import skimage

    return Path(skimage.__file__).parent / "data"


#: The shop's categories and the photos of each; "building materials" and "space posters" are
#: not in worker/data/taxonomy.yaml, the others are (with a zero-shot map that is partly wrong).
SHOP = {
    "kitchenware": ["coffee.png"],
    "vehicles & parts": ["motorcycle_left.png", "motorcycle_right.png"],
    "watches": ["clock_motion.png"],
    "pet supplies": ["chelsea.png"],
    "building materials": ["brick.png", "gravel.png"],
    "space posters": ["astronaut.png", "rocket.jpg", "hubble_deep_field.jpg"],
}
PER_CATEGORY = 24


def augment(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A distinct product shot from one photo: random crop (40-100 % of the side), flip,
    small rotation, brightness/contrast/colour jitter."""
    w, h = photo.size
    side = rng.uniform(0.4, 1.0)
    cw, ch = int(w * side), int(h * side)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = photo.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    img = img.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR, expand=False)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(float(rng.uniform(0.7, 1.3)))
    return img.resize((288, int(288 * img.height / img.width) or 1))


def analyse_and_label(url: str, settings: Settings, seed: int = 0) -> dict[str, int]:
    """Store each augmented photo as a processed image (embedding + the zero-shot map's best
    category as a tag, exactly what the tagging step returns) with a reviewed category label."""
    rng = np.random.default_rng(seed)
    step, model = TaggingStep(), tagging_model(settings)
    version = step.version(settings)
    counts = {"heldout": 0, "train": 0}
    with transaction(url) as s:
        for category, files in SHOP.items():
            photos = [Image.open(photo_dir() / f).convert("RGB") for f in files]
            for i in range(PER_CATEGORY):
                img = augment(photos[i % len(photos)], rng)
                result = model.infer(img)
                out = step.to_step_result(result, settings, categoriser(settings))
                listing = m.Listing(external_id=f"acc-{uuid.uuid4().hex[:10]}", seller_id="shop", title="",
                                    status="done")
                s.add(listing)
                s.flush()
                image = m.Image(listing_id=listing.id, url="file:///photo.png", status="done",
                                width=img.width, height=img.height)
                s.add(image)
                s.flush()
                s.add(m.Embedding(image_id=image.id, model_version=version, dim=1280,
                                  vector=np.asarray(out.embedding, dtype="<f4").tobytes()))
                best = out.data["category"]
                # the best category even when below category_min_score: the fairest zero-shot figure
                s.add(m.Tag(listing_id=listing.id, image_id=image.id, name=best["name"], score=best["score"],
                            source="category-map", model_version=version))
                split = split_for(image.id, None, 30)
                counts[split] += 1
                s.add(m.Label(image_id=image.id, kind="category", action="set", name=category, source="review",
                              reviewer="shop-reviewer", split=split, corrects_model_version=version))
    return counts


# --- a real deployment (see tests/worker/training/conftest.py ``deployment``) ----------------


def sql(dsn: str, query: str, *params: object) -> list[tuple]:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall()
    finally:
        conn.close()


def submit_listing(d: dict, external_id: str, photo: Path) -> None:
    """A listing.created event with one local photo on the deployment's stream."""
    d["redis"].xadd("reload:events", {"event": json.dumps({
        "event_id": str(uuid.uuid4()), "type": "listing.created", "occurred_at": datetime.now(UTC).isoformat(),
        "listing": {"id": external_id, "seller_id": "s1", "title": "t", "category": None, "images": [str(photo)]},
    })})


def listing_category(d: dict, external_id: str) -> tuple[str, str, str] | None:
    """(name, source, model_version) of the listing's best category tag once it is done."""
    rows = sql(d["dsn"], """SELECT t.name, t.source, t.model_version FROM tags t JOIN listings l
                             ON l.id = t.listing_id WHERE l.external_id = %s
                             AND t.source IN ('category-map', 'category-head') ORDER BY t.score DESC""",
                external_id)
    done = sql(d["dsn"], "SELECT status FROM listings WHERE external_id = %s", external_id)
    return rows[0] if done and done[0][0] == "done" and rows else None
