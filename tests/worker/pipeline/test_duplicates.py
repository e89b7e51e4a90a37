"""The database side of the duplicate search: band rows, candidates, the writer in the store
transaction, its advisory locks under concurrency, and the whole pipeline on a stolen photo."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageOps
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from db import models as m
from db.fraud_models import ImageHashBand
from db.session import get_engine, session_factory
from tests.support.fraud import add_image, step_context, stolen_copy
from tests.support.pipeline import analyze_all, apply, event
from tests.support.services import unique
from worker.fraud.duplicates import DuplicatesStep
from worker.pipeline import duplicates as pipeline_duplicates
from worker.pipeline.contract import StepResult, StepRun
from worker.pipeline.duplicates import DuplicateIndex, DuplicatesWriter
from worker.pipeline.registry import STEP_REGISTRY
from worker.pipeline.store import listing_fraud_score
from worker.pipeline.writers import WRITER_REGISTRY, WriteContext, apply_writers, get_writer
from worker.review.queue import claim_next_flag, resolve_flag


def _photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


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


def _process(session: Session, seller: str, img: Image.Image, embedding: np.ndarray | None = None,
             **settings: Any) -> tuple[int, StepResult]:
    """What analyze_image does for this step: run it (pure), then its writer in the session."""
    listing, row, raw = add_image(session, seller, img)
    ctx = step_context(listing, row, raw, img, **settings)
    if embedding is not None:
        ctx.results["tagging"] = StepResult(embedding=embedding)
    result = DuplicatesStep().run(ctx)
    wctx = WriteContext(session=session, image_id=row.id, listing_id=listing.id,
                        seller_id=listing.seller_id, settings=ctx.settings)
    result = DuplicatesWriter().write(wctx, result)
    session.flush()
    return row.id, result


def test_every_writer_belongs_to_a_registered_step() -> None:
    assert set(WRITER_REGISTRY) <= set(STEP_REGISTRY)
    for step in WRITER_REGISTRY:
        writer = get_writer(step)
        assert writer is not None and writer.step == step
    assert get_writer("metadata") is None


def test_copy_under_another_seller_is_flagged_not_under_the_same(session: Session) -> None:
    original = _photo("coffee")
    original_id, first = _process(session, "seller-a", original)
    assert first.flags == [] and first.data["searched"] and first.data["candidates"] == 0
    rows = session.execute(select(func.count()).select_from(ImageHashBand)
                           .where(ImageHashBand.image_id == original_id)).scalar_one()
    assert rows == len(first.data["hashes"]) * 4  # every stored view's hash, four bands each

    copy = stolen_copy(original)
    _, reused = _process(session, "seller-a", copy)  # the seller's own photo again: not fraud
    assert reused.flags == [] and reused.data["matches_same_seller"] >= 1

    _, stolen = _process(session, "seller-b", copy)
    assert [f.kind for f in stolen.flags] == ["duplicate_image"]
    ev = stolen.flags[0].evidence
    assert original_id in {mm["matched_image_id"] for mm in ev["matches"]}
    assert ev["matched_seller_id"] == "seller-a"
    first_match = next(mm for mm in ev["matches"] if mm["matched_image_id"] == original_id)
    assert first_match["hash_kind"] == "phash+dhash" and first_match["mirrored"] is True
    assert first_match["hamming_distance"] <= 14
    assert ev["matched_listing_external_id"].startswith("ext-")
    assert "another seller (seller-a)" in ev["summary"]

    _, unrelated = _process(session, "seller-c", _photo("rocket"))
    assert unrelated.flags == []


def test_identical_bytes_and_stored_embeddings_are_used(session: Session) -> None:
    original = _photo("chelsea")
    _process(session, "seller-a", original)
    _, same = _process(session, "seller-b", original)
    assert same.flags[0].evidence["hash_kind"] == "sha256"

    # A stored embedding of the same size is compared: an orthogonal one vetoes the hash match.
    copy = stolen_copy(original)
    recopy = copy.resize((copy.width - 4, copy.height - 4))  # other bytes: not an identical file
    vec = np.zeros(8, dtype=np.float32)
    vec[0] = 1.0
    copy_id, _ = _process(session, "seller-c", copy)
    session.add(m.Embedding(image_id=copy_id, model_version="t", dim=8, vector=vec.tobytes()))
    session.flush()
    other = np.zeros(8, dtype=np.float32)
    other[1] = 1.0
    _, vetoed = _process(session, "seller-d", recopy, embedding=other)
    assert vetoed.data["embedding_used"]
    assert copy_id not in {mm["matched_image_id"] for f in vetoed.flags for mm in f.evidence["matches"]}
    _, confirmed = _process(session, "seller-e", recopy, embedding=vec)
    match = next(mm for mm in confirmed.flags[0].evidence["matches"] if mm["matched_image_id"] == copy_id)
    assert match["cosine"] == 1.0


def test_band_rows_are_replaced_not_duplicated(session: Session) -> None:
    img = _photo("astronaut")
    listing, row, raw = add_image(session, "s", img)
    hashes = DuplicatesStep().run(step_context(listing, row, raw, img)).handoff.stored
    for _ in range(2):
        DuplicateIndex.store(session, row.id, hashes)
    assert DuplicateIndex.load(session, [row.id])[row.id]["full"]["phash"] == next(
        h.value for h in hashes if h.view == "full" and h.kind == "phash")
    assert session.execute(select(func.count()).select_from(ImageHashBand)
                           .where(ImageHashBand.image_id == row.id)).scalar_one() == len(hashes) * 4


# --- two live Postgres transactions -----------------------------------------------------------


def _race(url: str) -> tuple[bool, list[str]]:
    """Store transaction A runs the writer on an original and stays open; B runs it on a
    mirrored copy by another seller. Returns (B was still waiting after 1 s, B's flag kinds).
    Commits to the shared test database, so it deletes its listings afterwards."""
    original = _photo("astronaut")
    copy = ImageOps.mirror(original).resize((384, 384))
    factory = session_factory(url)
    first, second = factory(), factory()
    with first.begin():
        l1, r1, raw1 = add_image(first, unique("seller-a"), original)
    with second.begin():
        l2, r2, raw2 = add_image(second, unique("seller-b"), copy)
    listing_ids = [l1.id, l2.id]

    def prepare(s: Session, listing: m.Listing, row: m.Image, raw: bytes, img: Image.Image
                ) -> tuple[WriteContext, StepRun]:
        """The compute phase, done up front so that B's thread only does database work."""
        ctx = step_context(listing, row, raw, img, database_url=url)
        wctx = WriteContext(session=s, image_id=row.id, listing_id=listing.id, seller_id=listing.seller_id,
                            settings=ctx.settings)
        return wctx, StepRun("duplicates", DuplicatesStep.VERSION, "ok", 1.0, result=DuplicatesStep().run(ctx))

    def store(prepared: tuple[WriteContext, StepRun]) -> StepResult:
        """As the store transaction does it: through apply_writers (the writer in a savepoint)."""
        (stored,) = apply_writers(prepared[0], [prepared[1]])
        assert stored.status == "ok" and stored.result is not None, stored.error
        return stored.result

    a, b = prepare(first, l1, r1, raw1, original), prepare(second, l2, r2, raw2, copy)
    out: dict[str, StepResult] = {}
    try:
        tx = first.begin()
        assert store(a).flags == []  # bands written, not committed

        def run_second() -> None:
            with second.begin():
                out["b"] = store(b)

        thread = threading.Thread(target=run_second)
        thread.start()
        thread.join(1.0)
        waited = thread.is_alive()
        tx.commit()
        thread.join(30)
        assert not thread.is_alive()
    finally:
        first.close()
        second.close()
        with factory() as s, s.begin():
            s.execute(delete(m.Listing).where(m.Listing.id.in_(listing_ids)))
    return waited, [f.kind for f in out["b"].flags]


@pytest.mark.postgres
def test_concurrent_copies_wait_for_each_other_on_postgres(pg_url: str) -> None:
    """Two sellers' copies stored at the same moment: the second search must see the first."""
    waited, kinds = _race(pg_url)
    assert waited, "the second search did not wait for the first image's commit"
    assert kinds == ["duplicate_image"]


@pytest.mark.postgres
def test_without_the_band_lock_the_race_is_lost(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Control for the test above: it really races. Without lock_bands the second search runs
    at once, before the first image's bands are committed, and the copy goes unflagged."""
    monkeypatch.setattr(pipeline_duplicates, "lock_bands", lambda session, hashes: None)
    waited, kinds = _race(pg_url)
    assert not waited and kinds == []


# --- the whole pipeline ------------------------------------------------------------------------


def test_stolen_photo_is_flagged_through_the_pipeline(db_url: str, tmp_path: Path, make_settings) -> None:
    settings = make_settings(database_url=db_url, steps=["metadata", "duplicates", "quality", "tamper"])
    original = _photo("chelsea")
    original.save(tmp_path / "cat.jpg", quality=92)
    ImageOps.mirror(original).resize((300, 200)).save(tmp_path / "copy.jpg", quality=40)

    seller_a, seller_b = unique("seller"), unique("seller")
    first = apply(db_url, event(unique("L"), [str(tmp_path / "cat.jpg")], seller=seller_a))
    assert [r.status for r in analyze_all(db_url, settings, first.images_to_analyze)] == ["done"]
    second = apply(db_url, event(unique("L"), [str(tmp_path / "copy.jpg")], seller=seller_b))
    assert second.listing_id is not None
    second_listing = second.listing_id
    (outcome,) = analyze_all(db_url, settings, second.images_to_analyze)
    assert outcome.status == "done"
    dup_run = next(r for r in outcome.steps if r.step == "duplicates")
    assert dup_run.result is not None and dup_run.result.data["searched"] is True

    factory = session_factory(db_url)
    with factory() as s:
        (orig_id,) = first.images_to_analyze
        (copy_id,) = second.images_to_analyze
        rows = s.execute(select(func.count()).select_from(ImageHashBand)
                         .where(ImageHashBand.image_id == orig_id)).scalar_one()
        assert rows >= 11 * 2 * 4  # views x kinds x bands
        output = s.execute(select(m.StepRunRecord.output).where(
            m.StepRunRecord.image_id == copy_id, m.StepRunRecord.step == "duplicates")).scalar_one()
        assert output["searched"] is True and output["matches_other_sellers"] == 1
        flags = s.execute(select(m.Flag).where(m.Flag.image_id == copy_id)).scalars().all()
        dup = [f for f in flags if f.kind == "duplicate_image"]
        assert len(dup) == 1 and dup[0].evidence["matched_image_id"] == orig_id
        assert dup[0].evidence["matched_seller_id"] == seller_a
        assert s.execute(select(m.Flag).where(m.Flag.image_id == orig_id,
                                              m.Flag.kind == "duplicate_image")).first() is None
        score = listing_fraud_score(s, second_listing, settings)
        assert score.contributions["duplicate_image"] > 0.3
        assert s.get_one(m.Listing, second_listing).fraud_decision in ("review", "hold")

    with factory() as s, s.begin():
        claimed = claim_next_flag(s, "rev", 60, kind="duplicate_image")
        while claimed is not None and claimed.id != dup[0].id:  # other tests' flags (shared DB)
            claimed = claim_next_flag(s, "rev", 60, kind="duplicate_image")
        assert claimed is not None
        resolve_flag(s, claimed.id, "rev", "confirmed", "same cat, mirrored", settings=settings)
    with factory() as s:
        assert listing_fraud_score(s, second_listing, settings).contributions["duplicate_image"] == 0.6


# --- who uploaded first (issue 12, item 13) -----------------------------------------------------


def _unique_photo() -> Image.Image:
    """A photo no other test (nor an earlier run on the shared database) has: smooth random
    shapes, so its perceptual hashes are its own."""
    rng = np.random.default_rng()
    small = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((448, 320), Image.Resampling.BICUBIC)


def _resaved(img: Image.Image, scale: float = 0.75, quality: int = 70) -> Image.Image:
    """The usual copy: downloaded, resized and saved again as a JPEG."""
    out = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _rewrite(session: Session, listing: m.Listing, row: m.Image, img: Image.Image) -> StepResult:
    """Run the step and its writer again on an image that is already stored (a re-analysis)."""
    ctx = step_context(listing, row, b"", img)
    wctx = WriteContext(session=session, image_id=row.id, listing_id=listing.id,
                        seller_id=listing.seller_id, settings=ctx.settings)
    result = DuplicatesWriter().write(wctx, DuplicatesStep().run(ctx))
    session.flush()
    return result


def test_the_seller_who_uploaded_first_is_never_flagged_and_every_flag_names_them(session: Session) -> None:
    original = _unique_photo()
    copy = _resaved(original)
    first_id, first = _process(session, "seller-a", original)
    assert first.flags == []
    thief_id, thief = _process(session, "seller-b", copy)  # a later copy by another seller
    assert [f.kind for f in thief.flags] == ["duplicate_image"]
    origin = thief.flags[0].evidence["first_upload"]
    assert (origin["seller_id"], origin["image_id"]) == ("seller-a", first_id)
    assert origin["listing_external_id"].startswith("ext-") and origin["first_seen"]
    assert "first uploaded by seller seller-a" in thief.flags[0].evidence["summary"]

    # The owner re-uses the photo in a new listing: B's later copy is no reason to flag A.
    _, reuse = _process(session, "seller-a", _resaved(original, 0.9, 85))
    assert reuse.flags == []
    assert reuse.data["matches_other_sellers"] >= 1 and reuse.data["first_upload_by_this_seller"] is True
    assert reuse.data["first_upload"]["image_id"] == first_id

    # A's original analysed again (e.g. a new model version) after B's copy exists: still A's.
    listing_a = session.get_one(m.Listing, session.get_one(m.Image, first_id).listing_id)
    again = _rewrite(session, listing_a, session.get_one(m.Image, first_id), original)
    assert again.flags == [] and again.data["matches_other_sellers"] >= 1

    # A third seller's copy names A as the first uploader, not B.
    _, third = _process(session, "seller-c", copy)
    assert third.flags[0].evidence["first_upload"]["seller_id"] == "seller-a"
    assert {mm["matched_image_id"] for mm in third.flags[0].evidence["matches"]} >= {thief_id}


def test_a_thief_who_reuses_a_stolen_photo_is_still_flagged(session: Session) -> None:
    original = _unique_photo()
    _process(session, "seller-a", original)
    _, stolen = _process(session, "seller-b", _resaved(original))
    _, again = _process(session, "seller-b", _resaved(original, 0.6, 60))  # B owns a copy, not the first
    assert [f.kind for f in stolen.flags] == [f.kind for f in again.flags] == ["duplicate_image"]
    assert again.flags[0].evidence["first_upload"]["seller_id"] == "seller-a"
    assert again.data["first_upload_by_this_seller"] is False


def test_original_owner_reusing_a_photo_through_the_pipeline_is_ok(db_url: str, tmp_path: Path,
                                                                  make_settings) -> None:
    settings = make_settings(database_url=db_url, steps=["metadata", "duplicates"])
    original = _unique_photo()
    original.save(tmp_path / "photo.jpg", quality=92)
    _resaved(original).save(tmp_path / "copy.jpg", quality=80)
    seller_a, seller_b = unique("seller"), unique("seller")
    decisions = []
    for seller, name in ((seller_a, "photo.jpg"), (seller_b, "copy.jpg"), (seller_a, "photo.jpg")):
        out = apply(db_url, event(unique("L"), [str(tmp_path / name)], seller=seller))
        assert [r.status for r in analyze_all(db_url, settings, out.images_to_analyze)] == ["done"]
        with session_factory(db_url)() as s:
            decisions.append(s.get_one(m.Listing, out.listing_id).fraud_decision)
            flags = s.execute(select(m.Flag).where(m.Flag.listing_id == out.listing_id)).scalars().all()
    assert decisions[1] in ("review", "hold")  # B's copy is flagged...
    assert decisions[2] == "ok" and flags == []  # ...A's own photo again is not
