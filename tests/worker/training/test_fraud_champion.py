"""The listing fraud score uses the promoted fraud-scorer weights (hot, like the category
head) and goes back to CATALOG_FRAUD_WEIGHTS on rollback."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable

import pytest

from db import models as m
from db.session import transaction
from worker.config import Settings
from worker.fraud.champion import FIXED, fraud_weights
from worker.pipeline.store import lock_listing, update_fraud_score
from worker.training import registry

FIXED_WEIGHTS = {"contact_info": 0.2, "duplicate_image": 0.9}


def _listing_with_flags(url: str) -> int:
    with transaction(url) as s:
        listing = m.Listing(external_id=f"fw-{uuid.uuid4().hex[:8]}", seller_id="s", title="", status="done")
        s.add(listing)
        s.flush()
        image = m.Image(listing_id=listing.id, url="https://img.example/a.jpg", status="done", complete=True)
        s.add(image)
        s.flush()
        s.add(m.Flag(listing_id=listing.id, image_id=image.id, kind="contact_info", score=1.0, evidence={},
                     model_version="t"))
        return listing.id


def _rescore(url: str, listing_id: int, settings: Settings) -> tuple[float, str]:
    with transaction(url) as s:
        listing = lock_listing(s, listing_id)
        update_fraud_score(s, listing, settings)
        return float(listing.fraud_score or 0), str(listing.fraud_decision)


def _weights_version(settings: Settings, url: str, weights: dict[str, float], tag: str) -> m.ModelVersion:
    path = registry.model_dir(settings, registry.FRAUD_SCORER) / "versions" / f"weights-{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"weights": weights, "review_threshold": 0.5, "block_threshold": 0.85}))
    with transaction(url) as s:
        return registry.register(s, registry.FRAUD_SCORER, path, {}, None)


def test_listing_score_follows_the_fraud_champion_and_rollback(
        train_url: str, settings_for: Callable[..., Settings], caplog: pytest.LogCaptureFixture) -> None:
    settings = settings_for(train_url, fraud_weights=FIXED_WEIGHTS)
    listing_id = _listing_with_flags(train_url)
    assert _rescore(train_url, listing_id, settings) == (0.2, "ok")  # fixed: 0.2 * 1.0
    assert fraud_weights(settings).version == FIXED

    learnt = _weights_version(settings, train_url, {"contact_info": 0.95, "duplicate_image": 0.15}, "a")
    with transaction(train_url) as s:
        registry.promote(s, settings, s.get_one(m.ModelVersion, learnt.id))
    with caplog.at_level(logging.INFO, logger="worker.pipeline.store"):
        assert _rescore(train_url, listing_id, settings) == (0.95, "hold")  # the learnt 0.95
    assert f"with fraud-scorer@{learnt.version}" in caplog.text  # the score names its weights

    # A second promotion is picked up by the next score too (file changed: cache key changed).
    other = _weights_version(settings, train_url, {"contact_info": 0.6}, "b")
    with transaction(train_url) as s:
        registry.promote(s, settings, s.get_one(m.ModelVersion, other.id))
    assert _rescore(train_url, listing_id, settings) == (0.6, "review")
    assert fraud_weights(settings).version == f"fraud-scorer@{other.version}"

    with transaction(train_url) as s:
        registry.rollback(s, settings, registry.FRAUD_SCORER)  # back to the first learnt weights
    assert _rescore(train_url, listing_id, settings)[0] == 0.95
    with transaction(train_url) as s:
        registry.rollback(s, settings, registry.FRAUD_SCORER)  # no earlier champion: fixed weights
    assert _rescore(train_url, listing_id, settings) == (0.2, "ok")


def test_a_broken_champion_file_falls_back_to_the_fixed_weights(
        tmp_path: object, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(fraud_weights=FIXED_WEIGHTS)
    path = settings.effective_sr_model_dir / "fraud-scorer" / "champion.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    chosen = fraud_weights(settings)
    assert chosen.version == FIXED and chosen.weights == FIXED_WEIGHTS
