"""Attribute heads: one head per labelled attribute, trained and promoted like the category
head; the tagging step then emits ``<name>:<value>`` tags (source attribute-head) and names the
head's version in its own, and drops them again after a rollback."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from sqlalchemy import select

from db import models as m
from db.session import transaction
from tests.support.training import MATERIAL, seed_attribute_labels, seed_catalogue
from worker.config import Settings
from worker.steps.tagging import Tagging, TaggingStep, attribute_heads, categoriser, with_head_versions
from worker.training import registry
from worker.training.attributes import attribute_slug, attribute_targets, model_name
from worker.training.retrain import run_retrain


def test_slug_and_listing_labels_spread_to_images(train_url: str) -> None:
    assert attribute_slug(" Sleeve length ") == "sleeve_length" and model_name("Style") == "attribute-head-style"
    with transaction(train_url) as s:
        listing = m.Listing(external_id="attr-1", seller_id="s", title="", status="done")
        s.add(listing)
        s.flush()
        a, b = (m.Image(listing_id=listing.id, position=i, url=f"https://x/{i}.jpg") for i in range(2))
        s.add_all([a, b])
        s.flush()
        s.add(m.Label(listing_id=listing.id, kind="attribute", action="set", name="Pattern", value="striped",
                      source="review", reviewer="r", split="train"))
        s.add(m.Label(image_id=b.id, kind="attribute", action="set", name="Pattern", value="plain",
                      source="review", reviewer="r", split="heldout"))
        s.add(m.Label(image_id=b.id, kind="category", action="set", name="bags", source="review", reviewer="r",
                      split="train"))  # not an attribute
        targets = attribute_targets(s)
    assert targets == {"pattern": {a.id: ("striped", "train"), b.id: ("plain", "heldout")}}


@pytest.mark.slow  # trains a head (~2 s of lazy torch imports in a fresh process)
def test_attribute_head_is_trained_promoted_tagged_and_rolled_back(
        train_url: str, settings_for: Callable[..., Settings]) -> None:
    seeded = seed_catalogue(train_url, per_class=30)
    seed_attribute_labels(train_url, seeded.images)
    settings = settings_for(train_url, steps=["tagging"])
    step = TaggingStep()
    plain_version = step.version(settings)

    reports = run_retrain(settings, None) or []  # the default retrain includes attribute heads
    by_what = {r.what: r for r in reports}
    assert set(by_what) == {"category", "fraud", "attribute:material"}
    material = by_what["attribute:material"]
    assert material.decision == "promoted", material.reason
    assert material.baseline_name == "majority class" and material.candidate["accuracy"] > 0.9  # type: ignore[index]
    assert material.version and material.version.startswith("attribute-head-material@")

    [head] = attribute_heads(settings)
    assert head.name == "material" and head.version == material.version
    assert set(head.head.classes) == set(MATERIAL.values())
    # The embedding of a seeded vinyl record is tagged with its material by the promoted head.
    vinyl = next(i for i, c in seeded.images.items() if c == "vinyl-records")
    with transaction(train_url) as s:
        vector = s.scalars(select(m.Embedding.vector).where(m.Embedding.image_id == vinyl)).one()
    tagging = Tagging(probs=torch.full((1000,), 1e-3), embedding=np.frombuffer(vector, dtype="<f4").copy())
    out = step.to_step_result(tagging, settings, categoriser(settings), attribute_heads(settings))
    attr_tags = [(t.name, t.source) for t in out.tags if t.source == "attribute-head"]
    assert attr_tags == [("material:vinyl", "attribute-head")]
    assert out.data["attributes"]["material"]["version"] == material.version
    version = step.version(settings)
    assert version.endswith(f"+{material.version}") and version.startswith(plain_version.split("+")[0])

    with transaction(train_url) as s:
        registry.rollback(s, settings, "attribute-head-material")
    assert attribute_heads(settings) == []
    assert "attribute-head" not in step.version(settings)


def test_long_version_lists_fall_back_to_one_digest() -> None:
    base = "efficientnet-lite0-imagenet@0123abcd+category-head@89abcdef"
    short = with_head_versions(base, ["attribute-head-material@11111111"])
    assert short == f"{base}+attribute-head-material@11111111"
    many = [f"attribute-head-attribute{i}@{i:08d}" for i in range(4)]
    packed = with_head_versions(base, many)
    assert len(packed) <= 128 and packed.startswith(base + "+attribute-heads@")
    assert packed != with_head_versions(base, many[:3] + ["attribute-head-attribute3@99999999"])
