"""Event application and image analysis on both databases (SQLite and Postgres)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import func, select

from db import models as m
from db.session import session_factory
from tests.conftest import unique
from worker.intake.events import parse_event
from worker.pipeline.analyze import analyze_image
from worker.pipeline.events import apply_event
from worker.pipeline.sweep import stale_images


def event(listing_id: str, images: list[str], *, etype: str = "listing.created", event_id: str | None = None,
          seller: str = "s1", at: datetime | None = None, category: str | None = "kitchenware") -> dict:
    return {
        "event_id": event_id or unique("ev"),
        "type": etype,
        "occurred_at": (at or datetime.now(timezone.utc)).isoformat(),
        "listing": {"id": listing_id, "seller_id": seller, "title": "t", "category": category,
                    "images": images},
    }


def photo(path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 48)) -> str:
    img = Image.new("RGB", size, colour)
    for x in range(0, size[0], 8):  # some structure so hashes are not degenerate
        img.paste((x * 3 % 255, 90, 160), (x, 0, x + 4, size[1]))
    img.save(path)
    return str(path)


def apply(url: str, payload: dict):  # noqa: ANN201
    factory = session_factory(url)
    with factory() as session, session.begin():
        return apply_event(session, parse_event(payload))


def analyze_all(url: str, settings, ids: list[int]) -> list:  # noqa: ANN001
    factory = session_factory(url)
    out = []
    for image_id in ids:
        with factory() as session:
            out.append(analyze_image(session, image_id, settings))
    return out


def count(url: str, model, *where) -> int:  # noqa: ANN001
    with session_factory(url)() as session:
        return session.execute(select(func.count()).select_from(model).where(*where)).scalar_one()


def test_same_event_three_times_gives_one_set_of_rows(db_url: str, tmp_path: Path) -> None:
    listing = unique("L")
    payload = event(listing, [photo(tmp_path / "a.png"), photo(tmp_path / "b.png", (0, 200, 0))])
    outcomes = [apply(db_url, payload) for _ in range(3)]
    assert [o.outcome for o in outcomes] == ["applied", "duplicate", "duplicate"]
    # A redelivered event re-announces the images still pending (lost enqueue after commit).
    assert outcomes[1].images_to_analyze == outcomes[0].images_to_analyze
    lid = outcomes[0].listing_id
    assert count(db_url, m.Listing, m.Listing.external_id == listing) == 1
    assert count(db_url, m.Image, m.Image.listing_id == lid) == 2
    assert count(db_url, m.ProcessedEvent, m.ProcessedEvent.event_id == payload["event_id"]) == 1


def test_analysis_stores_metadata_and_finishes_listing(db_url: str, tmp_path: Path, make_settings) -> None:
    settings = make_settings(database_url=db_url)
    out = apply(db_url, event(unique("L"), [photo(tmp_path / "a.png"), photo(tmp_path / "b.jpg", (0, 0, 200))]))
    results = analyze_all(db_url, settings, out.images_to_analyze)
    assert [r.status for r in results] == ["done", "done"]
    with session_factory(db_url)() as session:
        listing = session.get(m.Listing, out.listing_id)
        assert listing.status == "done" and listing.processed_at is not None
        first, second = listing.images
        assert (first.width, first.height, first.format) == (64, 48, "PNG")
        assert second.format == "JPEG"
        assert len(first.sha256) == 64 and first.phash is not None and first.dhash is not None
        runs = session.execute(select(m.StepRunRecord).where(m.StepRunRecord.image_id == first.id)).scalars().all()
        assert [(r.step, r.status) for r in runs] == [("metadata", "ok")]
        assert runs[0].output["width"] == 64
    # Analysing a finished image again is a no-op (at-least-once delivery of the task).
    again = analyze_all(db_url, settings, out.images_to_analyze[:1])
    assert again[0].status == "skipped"
    assert count(db_url, m.StepRunRecord, m.StepRunRecord.image_id == out.images_to_analyze[0]) == 1


def test_update_reprocesses_only_changed_images(db_url: str, tmp_path: Path, make_settings) -> None:
    settings = make_settings(database_url=db_url)
    listing = unique("L")
    a, b, c = photo(tmp_path / "a.png"), photo(tmp_path / "b.png", (0, 90, 0)), photo(tmp_path / "c.png", (9, 9, 9))
    first = apply(db_url, event(listing, [a, b]))
    analyze_all(db_url, settings, first.images_to_analyze)
    with session_factory(db_url)() as session:
        runs_before = {r.image_id: r.id for r in session.execute(select(m.StepRunRecord)).scalars()
                       if r.image_id in first.images_to_analyze}

    photo(tmp_path / "b.png", (250, 250, 0))  # b's bytes change, a stays, c is new
    update = apply(db_url, event(listing, [a, b, c], etype="listing.updated"))
    results = analyze_all(db_url, settings, update.images_to_analyze)
    by_url = dict(zip([a, b, c], results, strict=True))
    assert by_url[a].detail.startswith("unchanged bytes")
    assert by_url[b].steps and by_url[c].steps  # really re-analysed
    with session_factory(db_url)() as session:
        img_a = session.execute(select(m.Image).where(m.Image.url == a, m.Image.listing_id == first.listing_id)).scalar_one()
        run_a = session.execute(select(m.StepRunRecord).where(m.StepRunRecord.image_id == img_a.id)).scalar_one()
        assert run_a.id == runs_before[img_a.id]  # untouched
        assert session.get(m.Listing, first.listing_id).status == "done"

    # Dropping an image from the listing removes its row and results.
    apply(db_url, event(listing, [c], etype="listing.updated"))
    assert count(db_url, m.Image, m.Image.listing_id == first.listing_id) == 1


def test_delete_and_stale_events(db_url: str, tmp_path: Path) -> None:
    listing = unique("L")
    t0 = datetime.now(timezone.utc)
    created = apply(db_url, event(listing, [photo(tmp_path / "a.png")], at=t0))
    deleted = apply(db_url, event(listing, [], etype="listing.deleted", at=t0 + timedelta(seconds=5)))
    assert deleted.outcome == "applied"
    late = apply(db_url, event(listing, [photo(tmp_path / "z.png")], etype="listing.updated", at=t0 + timedelta(seconds=1)))
    assert late.outcome == "stale" and late.images_to_analyze == []
    with session_factory(db_url)() as session:
        assert session.get(m.Listing, created.listing_id).status == "deleted"


def test_bad_images_fail_with_reasons_and_good_one_succeeds(db_url: str, tmp_path: Path, make_settings) -> None:
    from tests.support.images import (
        write_not_an_image,
        write_png_bomb,
        write_truncated_jpeg,
    )

    settings = make_settings(database_url=db_url, max_pixels=50_000_000)
    good = photo(tmp_path / "good.png")
    truncated, text, bomb = tmp_path / "t.jpg", tmp_path / "x.jpg", tmp_path / "bomb.png"
    write_truncated_jpeg(truncated)
    write_not_an_image(text)
    write_png_bomb(bomb, side=30000)
    refs = [good, str(truncated), str(text), str(bomb), "http://127.0.0.1:9/never.jpg", str(tmp_path / "missing.jpg")]
    out = apply(db_url, event(unique("L"), refs))
    results = analyze_all(db_url, settings, out.images_to_analyze)
    statuses = [r.status for r in results]
    assert statuses == ["done"] + ["failed"] * 5
    with session_factory(db_url)() as session:
        images = session.get(m.Listing, out.listing_id).images
        errors = [img.error for img in images]
        assert errors[0] is None
        assert errors[1].startswith("truncated:")
        assert errors[2].startswith("not_an_image:")
        assert errors[3].startswith("too_many_pixels:") and "30000x30000" in errors[3]
        assert errors[4].startswith("blocked_address:") and "loopback" in errors[4]
        assert errors[5].startswith("not_found:")
        assert session.get(m.Listing, out.listing_id).status == "done"


def test_image_that_keeps_killing_workers_is_failed_after_max_attempts(db_url: str, tmp_path: Path, make_settings) -> None:
    settings = make_settings(database_url=db_url)
    out = apply(db_url, event(unique("L"), [photo(tmp_path / "a.png")]))
    image_id = out.images_to_analyze[0]
    factory = session_factory(db_url)
    with factory() as session, session.begin():
        session.get(m.Image, image_id).attempts = 3  # three deliveries died mid-task
    with factory() as session:
        result = analyze_image(session, image_id, settings, max_attempts=3)
    assert result.status == "skipped"
    with factory() as session:
        img = session.get(m.Image, image_id)
        assert img.status == "failed" and img.error.startswith("gave_up: gave up after 3 attempts")
        assert img.listing.status == "done"


def test_stale_pending_images_are_found_once(db_url: str, tmp_path: Path) -> None:
    out = apply(db_url, event(unique("L"), [photo(tmp_path / "a.png")]))
    factory = session_factory(db_url)
    with factory() as session, session.begin():
        session.get(m.Image, out.images_to_analyze[0]).updated_at = datetime.now(timezone.utc) - timedelta(hours=2)
    with factory() as session, session.begin():
        first = stale_images(session, timedelta(minutes=15))
    with factory() as session, session.begin():
        second = stale_images(session, timedelta(minutes=15))
    assert out.images_to_analyze[0] in first
    assert out.images_to_analyze[0] not in second


@pytest.mark.postgres
def test_rollback_per_test_isolation(pg_session) -> None:  # noqa: ANN001
    """Writes through the rolled-back session never reach the shared database."""
    ext = unique("L")
    payload = parse_event(event(ext, []))
    with pg_session.begin():
        apply_event(pg_session, payload)
    assert pg_session.execute(select(m.Listing).where(m.Listing.external_id == ext)).scalar_one().status == "done"


def test_unchanged_image_is_reanalysed_when_the_pipeline_changed(db_url: str, tmp_path: Path, make_settings) -> None:
    listing, a = unique("L"), photo(tmp_path / "a.png")
    first = apply(db_url, event(listing, [a]))
    analyze_all(db_url, make_settings(database_url=db_url, steps=[]), first.images_to_analyze)
    again = apply(db_url, event(listing, [a], etype="listing.updated"))
    result = analyze_all(db_url, make_settings(database_url=db_url), again.images_to_analyze)[0]
    assert [r.step for r in result.steps] == ["metadata"]  # really re-ran: metadata is new


class _UnstorableStep:
    """A buggy step: its summary cannot be stored as JSON."""

    name = "unstorable"
    requires = ()
    version = "unstorable@1"

    def run(self, ctx):  # noqa: ANN001, ANN201
        from worker.pipeline.contract import StepResult

        return StepResult(data={"oops": object()})


def test_a_bug_while_storing_fails_the_image_with_a_reason(db_url: str, tmp_path: Path, make_settings,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.pipeline import registry as pipeline

    monkeypatch.setitem(pipeline.STEP_REGISTRY, "unstorable", "tests.worker.pipeline.test_processing:_UnstorableStep")
    monkeypatch.setitem(pipeline._instances, "unstorable", _UnstorableStep())
    settings = make_settings(database_url=db_url, steps=["metadata", "unstorable"])
    out = apply(db_url, event(unique("L"), [photo(tmp_path / "a.png"), photo(tmp_path / "b.png", (1, 2, 3))]))
    results = analyze_all(db_url, settings, out.images_to_analyze)
    assert [r.status for r in results] == ["failed", "failed"]
    assert results[0].detail.startswith("internal_error: ")
    with session_factory(db_url)() as session:
        listing = session.get(m.Listing, out.listing_id)
        assert listing.status == "done"  # the listing is not stuck in processing
        assert all(img.error.startswith("internal_error:") for img in listing.images)
