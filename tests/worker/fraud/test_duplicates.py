"""Duplicate photos across sellers: hashes, the band index and the step end to end."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageOps
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.fraud_models import ImageHashBand
from db.session import get_engine
from tests.support.fraud import add_image, context
from worker.fraud.duplicates import DuplicatesStep, band_values, best_match
from worker.fraud.fingerprint import fingerprint, trim_borders
from worker.pipeline.contract import StepResult


def _photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def _stolen_copy(img: Image.Image) -> Image.Image:
    """What a copier does: crop a strip, mirror, shrink, re-compress hard, add a frame."""
    w, h = img.size
    out = ImageOps.mirror(img.crop((0, 0, w, round(h * 0.85))))
    out = out.resize((out.width * 2 // 3, out.height * 2 // 3), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=35)
    out = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return ImageOps.expand(out, border=20, fill=(255, 255, 255))


@pytest.fixture
def session(db_url: str) -> Iterator[Session]:
    conn = get_engine(db_url).connect()
    outer = conn.begin()
    s = Session(bind=conn, join_transaction_mode="create_savepoint")
    try:
        yield s
    finally:
        s.close()
        outer.rollback()
        conn.close()


def _process(session: Session, seller: str, img: Image.Image, **settings: object) -> StepResult:
    listing, row, raw = add_image(session, seller, img)
    step = DuplicatesStep()
    result = step.run(context(session, listing, row, raw, img, **settings))
    step.persist(session, row, result)
    session.flush()
    return result


def test_bands_split_the_hash_and_pigeonhole_holds() -> None:
    value = 0x0123_4567_89AB_CDEF
    assert band_values(value) == [0x0123, 0x4567, 0x89AB, 0xCDEF]
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = int(rng.integers(0, 2**63)) * 2 + 1
        flips = rng.choice(64, size=3, replace=False)
        b = a
        for bit in flips:
            b ^= 1 << int(bit)
        assert any(x == y for x, y in zip(band_values(a), band_values(b)))


def test_trim_borders_removes_padding_only() -> None:
    img = _photo("coffee")
    framed = ImageOps.expand(img, border=(30, 12), fill=(250, 250, 250))
    assert trim_borders(framed).size == img.size
    assert trim_borders(img).size == img.size


def test_mirror_and_crop_views_match() -> None:
    img = _photo("chelsea")
    stored = {}
    for h in fingerprint(img):
        stored.setdefault(h.view, {})[h.kind] = h.value
    copy = _stolen_copy(img)
    query = fingerprint(copy, mirrored=True)
    match = best_match(query, stored)
    assert match is not None and match.mirrored and match.distance <= 14
    other = best_match(fingerprint(_photo("astronaut"), mirrored=True), stored)
    assert other is not None and other.distance > 30


def test_copy_under_another_seller_is_flagged_not_under_the_same(session: Session) -> None:
    original = _photo("coffee")
    first = _process(session, "seller-a", original)
    assert first.flags == [] and first.data["searched"]
    original_id = session.execute(select(func.max(ImageHashBand.image_id))).scalar_one()

    copy = _stolen_copy(original)
    reused = _process(session, "seller-a", copy)  # the seller's own photo again: not fraud
    assert reused.flags == [] and reused.data["matches_same_seller"] >= 1

    stolen = _process(session, "seller-b", copy)
    assert [f.kind for f in stolen.flags] == ["duplicate_image"]
    ev = stolen.flags[0].evidence
    assert original_id in {mm["matched_image_id"] for mm in ev["matches"]}
    assert ev["matched_seller_id"] == "seller-a"
    first_match = next(mm for mm in ev["matches"] if mm["matched_image_id"] == original_id)
    assert first_match["hash_kind"] == "phash+dhash" and first_match["mirrored"] is True
    assert first_match["hamming_distance"] <= 14
    assert ev["matched_listing_external_id"].startswith("ext-")
    assert "another seller (seller-a)" in ev["summary"]

    unrelated = _process(session, "seller-c", _photo("rocket"))
    assert unrelated.flags == []


def test_identical_bytes_are_matched_and_embedding_can_veto(session: Session) -> None:
    original = _photo("chelsea")
    _process(session, "seller-a", original)
    assert _process(session, "seller-b", original).flags[0].evidence["hash_kind"] == "sha256"

    # An embedding that disagrees completely vetoes a hash-only match (no stored vector:
    # the cosine is simply unknown and the hashes decide).
    listing, row, raw = add_image(session, "seller-d", _stolen_copy(original))
    ctx = context(session, listing, row, raw, _stolen_copy(original))
    ctx.results["tagging"] = StepResult(embedding=np.ones(8, dtype=np.float32))
    result = DuplicatesStep().run(ctx)
    assert result.data["embedding_used"] and result.flags  # no stored 8-d vectors: hashes decide


def test_without_database_the_step_only_hashes() -> None:
    img = _photo("rocket")
    listing = type("L", (), {"id": 1, "seller_id": "s"})()
    row = type("R", (), {"id": 1, "url": "u", "sha256": "x"})()
    result = DuplicatesStep().run(context(None, listing, row, b"", img))
    assert result.flags == [] and result.data["searched"] is False
    assert {h["view"] for h in result.data["hashes"]} >= {"full", "c85", "c70", "cut_left"}


def test_concurrent_copies_wait_for_each_other_on_postgres() -> None:
    """Two sellers' copies analysed at the same moment: the second search must see the first."""
    import threading

    import skimage.data
    from PIL import Image, ImageOps

    from db.session import session_factory
    from tests.support.fraud import add_image, context, throwaway_pg
    from worker.fraud.duplicates import DuplicatesStep

    original = Image.fromarray(skimage.data.astronaut())
    copy = ImageOps.mirror(original).resize((384, 384))
    step = DuplicatesStep()
    with throwaway_pg("fraud_race") as url:
        factory = session_factory(url)
        first, second = factory(), factory()
        with first.begin():
            l1, r1, raw1 = add_image(first, "seller-a", original)
        with second.begin():
            l2, r2, raw2 = add_image(second, "seller-b", copy)
        tx = first.begin()
        result_a = step.run(context(first, l1, r1, raw1, original, database_url=url))
        assert result_a.flags == []
        out: dict = {}

        def run_second() -> None:
            with second.begin():
                out["result"] = step.run(context(second, l2, r2, raw2, copy, database_url=url))

        thread = threading.Thread(target=run_second)
        thread.start()
        thread.join(1.0)
        assert thread.is_alive(), "the second search did not wait for the first image's commit"
        step.persist(first, first.get(type(r1), r1.id), result_a)
        tx.commit()
        thread.join(30)
        first.close()
        second.close()
        assert [f.kind for f in out["result"].flags] == ["duplicate_image"]
