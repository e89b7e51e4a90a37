"""The fraud steps inside the real pipeline: flags and hash rows land in the database."""

from __future__ import annotations

from pathlib import Path

import skimage.data
from PIL import Image, ImageOps
from sqlalchemy import func, select

from db import models as m
from db.fraud_models import ImageHashBand
from db.session import session_factory
from tests.conftest import unique
from tests.worker.pipeline.test_processing import analyze_all, apply, event
from worker.fraud.score import listing_fraud_score
from worker.review.queue import claim_next_flag, resolve_flag


def test_stolen_photo_is_flagged_through_the_pipeline(db_url: str, tmp_path: Path, make_settings) -> None:
    settings = make_settings(database_url=db_url, steps=["metadata", "duplicates", "quality", "tamper"])
    original = Image.fromarray(skimage.data.chelsea()).convert("RGB")
    original.save(tmp_path / "cat.jpg", quality=92)
    ImageOps.mirror(original).resize((300, 200)).save(tmp_path / "copy.jpg", quality=40)

    seller_a, seller_b = unique("seller"), unique("seller")
    first = apply(db_url, event(unique("L"), [str(tmp_path / "cat.jpg")], seller=seller_a))
    assert [r.status for r in analyze_all(db_url, settings, first.images_to_analyze)] == ["done"]
    second = apply(db_url, event(unique("L"), [str(tmp_path / "copy.jpg")], seller=seller_b))
    assert [r.status for r in analyze_all(db_url, settings, second.images_to_analyze)] == ["done"]

    factory = session_factory(db_url)
    with factory() as s:
        (orig_id,) = first.images_to_analyze
        (copy_id,) = second.images_to_analyze
        rows = s.execute(select(func.count()).select_from(ImageHashBand)
                         .where(ImageHashBand.image_id == orig_id)).scalar_one()
        assert rows >= 11 * 2 * 4  # views x kinds x bands
        flags = s.execute(select(m.Flag).where(m.Flag.image_id == copy_id)).scalars().all()
        dup = [f for f in flags if f.kind == "duplicate_image"]
        assert len(dup) == 1 and dup[0].evidence["matched_image_id"] == orig_id
        assert dup[0].evidence["matched_seller_id"] == seller_a
        assert s.execute(select(m.Flag).where(m.Flag.image_id == orig_id,
                                              m.Flag.kind == "duplicate_image")).first() is None
        score = listing_fraud_score(s, second.listing_id, settings)
        assert score.contributions["duplicate_image"] > 0.3

    with factory() as s, s.begin():
        claimed = claim_next_flag(s, "rev", 60, kind="duplicate_image")
        while claimed is not None and claimed.id != dup[0].id:  # other tests' flags (shared DB)
            claimed = claim_next_flag(s, "rev", 60, kind="duplicate_image")
        assert claimed is not None
        resolve_flag(s, claimed.id, "rev", "confirmed", "same cat, mirrored")
    with factory() as s:
        assert listing_fraud_score(s, second.listing_id, settings).contributions["duplicate_image"] == 0.6
