"""A small processed catalogue for the label tests: two listings whose images carry the model's
tags, a detection and a flag, committed on the test's database and removed afterwards (the
Postgres database is shared by the whole test session)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import delete

from db import models as m
from db.session import transaction


@dataclass(frozen=True)
class Catalogue:
    url: str
    listing: str  # external id of a three-image listing, declared category "bags" by its seller
    other: str  # external id of a one-image listing without a declared category
    image: int  # position 0 of `listing`, 640x480, tags backpack/bags, detection `detection`
    second: int  # position 1 of `listing`, 800x600
    lone: int  # the only image of `other`, 320x240
    unsized: int  # position 7 of `listing`, an image the metadata step has not measured (no width/height)
    detection: int  # "handbag" on `image` at (100 50 300 250), yolo-test-1
    other_detection: int  # on `second`
    flag: int  # a duplicate_image flag on `image`, fraud-test-1


@pytest.fixture
def catalogue(db_url: str) -> Iterator[Catalogue]:
    tag = uuid.uuid4().hex[:8]
    with transaction(db_url) as s:
        # The tests count and export labels over the whole table: labels other modules' tests
        # left on the shared Postgres database (finished tests; nothing runs beside us) go first.
        s.execute(delete(m.Label))
        a = m.Listing(external_id=f"shop-{tag}-a", seller_id="s1", title="bag", category="bags", status="done")
        b = m.Listing(external_id=f"shop-{tag}-b", seller_id="s2", title="shoe", status="done")
        s.add_all([a, b])
        s.flush()
        image = m.Image(listing_id=a.id, position=0, url="https://img.example/1.jpg", width=640, height=480,
                        status="done")
        second = m.Image(listing_id=a.id, position=1, url="https://img.example/2.jpg", width=800, height=600,
                         status="done")
        lone = m.Image(listing_id=b.id, position=0, url="https://img.example/3.jpg", width=320, height=240,
                       status="done")
        s.add_all([image, second, lone])
        s.flush()
        unsized = m.Image(listing_id=a.id, position=7, url="https://img.example/4.jpg", status="pending")
        s.add(unsized)
        s.flush()
        s.add_all([
            m.Tag(listing_id=a.id, image_id=image.id, name="backpack", score=0.7, source="imagenet",
                  model_version="tagging-test-1"),
            m.Tag(listing_id=a.id, image_id=image.id, name="bags", score=0.8, source="category-map",
                  model_version="tagging-test-1"),
            m.Tag(listing_id=a.id, image_id=second.id, name="shoes", score=0.6, source="category-map",
                  model_version="tagging-test-1"),
            m.Tag(listing_id=b.id, image_id=lone.id, name="bags", score=0.4, source="category-map",
                  model_version="tagging-test-1"),
        ])
        det = m.Detection(image_id=image.id, label="handbag", score=0.9, x0=100, y0=50, x1=300, y1=250,
                          model_version="yolo-test-1")
        other_det = m.Detection(image_id=second.id, label="person", score=0.5, x0=0, y0=0, x1=10, y1=10,
                                model_version="yolo-test-1")
        flag = m.Flag(listing_id=a.id, image_id=image.id, kind="duplicate_image", score=0.9, evidence={},
                      model_version="fraud-test-1")
        s.add_all([det, other_det, flag])
        s.flush()
        cat = Catalogue(db_url, a.external_id, b.external_id, image.id, second.id, lone.id, unsized.id,
                        det.id, other_det.id, flag.id)
    yield cat
    with transaction(db_url) as s:
        ids = [cat.image, cat.second, cat.lone, cat.unsized]
        s.execute(delete(m.Label).where(m.Label.image_id.in_(ids)))
        s.execute(delete(m.Listing).where(m.Listing.external_id.in_([cat.listing, cat.other])))
