"""Analysing images on both databases: read -> compute -> write, failures with reasons,
re-analysis rules, and no open transaction while the steps run."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import psycopg2
import pytest
from sqlalchemy import insert, select
from sqlalchemy.engine import make_url
from sqlalchemy.pool import QueuePool

from db import models as m
from db.session import get_engine, session_factory
from tests.support.pipeline import analyze_all, apply, count, event, photo
from tests.support.services import unique
from worker.config import Settings
from worker.pipeline import registry, writers
from worker.pipeline.analyze import analyze_image
from worker.pipeline.contract import ImageContext, StepResult, Tag
from worker.pipeline.writers import WriteContext


def _register(monkeypatch: pytest.MonkeyPatch, step: Any) -> None:
    """Make a test step known to the registry, as if it were named in STEP_REGISTRY."""
    monkeypatch.setitem(registry.STEP_REGISTRY, step.name, f"{__name__}:{type(step).__name__}")
    monkeypatch.setitem(registry._instances, step.name, step)


def test_analysis_stores_metadata_and_finishes_listing(db_url: str, tmp_path: Path, make_settings) -> None:
    settings = make_settings(database_url=db_url)
    out = apply(db_url, event(unique("L"), [photo(tmp_path / "a.png"), photo(tmp_path / "b.jpg", (0, 0, 200))]))
    results = analyze_all(db_url, settings, out.images_to_analyze)
    assert [r.status for r in results] == ["done", "done"]
    with session_factory(db_url)() as session:
        listing = session.get_one(m.Listing, out.listing_id)
        assert listing.status == "done" and listing.processed_at is not None
        assert listing.fraud_decision == "ok" and listing.fraud_score == 0.0
        first, second = listing.images
        assert (first.width, first.height, first.format) == (64, 48, "PNG")
        assert second.format == "JPEG"
        assert first.sha256 is not None and len(first.sha256) == 64
        assert first.phash is not None and first.dhash is not None
        assert first.attempts == 1
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
        img_a = session.execute(
            select(m.Image).where(m.Image.url == a, m.Image.listing_id == first.listing_id)).scalar_one()
        run_a = session.execute(select(m.StepRunRecord).where(m.StepRunRecord.image_id == img_a.id)).scalar_one()
        assert run_a.id == runs_before[img_a.id]  # untouched
        assert session.get_one(m.Listing, first.listing_id).status == "done"

    # Dropping an image from the listing removes its row and results.
    apply(db_url, event(listing, [c], etype="listing.updated"))
    assert count(db_url, m.Image, m.Image.listing_id == first.listing_id) == 1


def test_unchanged_image_is_reanalysed_when_the_pipeline_changed(db_url: str, tmp_path: Path, make_settings) -> None:
    listing, a = unique("L"), photo(tmp_path / "a.png")
    first = apply(db_url, event(listing, [a]))
    analyze_all(db_url, make_settings(database_url=db_url, steps=[]), first.images_to_analyze)
    again = apply(db_url, event(listing, [a], etype="listing.updated"))
    result = analyze_all(db_url, make_settings(database_url=db_url), again.images_to_analyze)[0]
    assert [r.step for r in result.steps] == ["metadata"]  # really re-ran: metadata is new


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
        images = session.get_one(m.Listing, out.listing_id).images
        assert images[0].error is None
        errors = [img.error or "" for img in images]
        assert errors[1].startswith("truncated:")
        assert errors[2].startswith("not_an_image:")
        assert errors[3].startswith("too_many_pixels:") and "30000x30000" in errors[3]
        assert errors[4].startswith("blocked_address:") and "loopback" in errors[4]
        assert errors[5].startswith("not_found:")
        assert session.get_one(m.Listing, out.listing_id).status == "done"


def test_image_that_keeps_killing_workers_is_failed_after_max_attempts(db_url: str, tmp_path: Path,
                                                                       make_settings) -> None:
    settings = make_settings(database_url=db_url)
    out = apply(db_url, event(unique("L"), [photo(tmp_path / "a.png"), photo(tmp_path / "b.png", (0, 0, 9))]))
    dying, retried = out.images_to_analyze
    factory = session_factory(db_url)
    with factory() as session, session.begin():
        # Three runs started; the last one died holding its lease (left behind, run out).
        image = session.get_one(m.Image, dying)
        image.attempts, image.lease_owner = 3, "dead-task#0/0123abcd"
        image.lease_expires_at = m.utcnow() - timedelta(seconds=5)
        # Three runs started too, but each ended normally (released its lease: fetch retries).
        session.get_one(m.Image, retried).attempts = 3
    with factory() as session:
        result = analyze_image(session, dying, settings, max_attempts=3)
    assert result.status == "failed"
    with factory() as session:
        img = session.get_one(m.Image, dying)
        assert img.status == "failed" and (img.error or "").startswith(
            "gave_up: 3 attempts started and the last one did not finish")
        assert img.lease_owner is None and img.attempts == 3
    # Runs that ended normally are no deaths: the image is analysed (a fourth attempt).
    (other,) = analyze_all(db_url, settings, [retried])
    assert other.status == "done"
    with factory() as session:
        assert session.get_one(m.Image, retried).attempts == 4
        assert session.get_one(m.Listing, out.listing_id).status == "done"


# --- no transaction during inference ----------------------------------------------------------


class _WatchStep:
    """Looks at the database from outside while it 'runs', like a slow model would."""

    name: ClassVar[str] = "watch"
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[dict[str, Any]] = []

    def version(self, settings: Settings) -> str:
        return "watch@1"

    def run(self, ctx: ImageContext) -> StepResult:
        pool = get_engine(self.url).pool
        assert isinstance(pool, QueuePool)
        seen: dict[str, Any] = {"pool_checked_out": pool.checkedout()}
        u = make_url(self.url)
        if u.get_backend_name() == "postgresql":
            conn = psycopg2.connect(host=u.host, port=u.port, user=u.username, dbname=u.database)
            conn.autocommit = True
            try:
                with conn.cursor() as cur:
                    # Every other session of this database that has a transaction open, whatever
                    # its state (idle in transaction is what a step holding one would show).
                    cur.execute("SELECT pid, state, left(query, 80) FROM pg_stat_activity "
                                "WHERE datname = %s AND pid <> pg_backend_pid() AND xact_start IS NOT NULL",
                                (u.database,))
                    seen["open_transactions"] = cur.fetchall()
            finally:
                conn.close()
        self.seen.append(seen)
        return StepResult(data={"watched": True})


def test_no_transaction_is_open_while_the_steps_run(db_url: str, tmp_path: Path, make_settings,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    watch = _WatchStep(db_url)
    _register(monkeypatch, watch)
    # duplicates first: its database work (band locks, search) must wait for the store phase.
    settings = make_settings(database_url=db_url, steps=["metadata", "duplicates", "watch"])
    out = apply(db_url, event(unique("L"), [photo(tmp_path / "a.png"), photo(tmp_path / "b.png", (0, 0, 90))]))
    results = analyze_all(db_url, settings, out.images_to_analyze)
    assert [r.status for r in results] == ["done", "done"]
    expected: dict[str, Any] = {"pool_checked_out": 0}  # no connection is even held by the worker
    if db_url.startswith("postgresql"):
        expected["open_transactions"] = []
    assert watch.seen == [expected, expected]
    assert count(db_url, m.StepRunRecord, m.StepRunRecord.step == "watch",
                 m.StepRunRecord.image_id.in_(out.images_to_analyze)) == 2


# --- the store phase checks what changed meanwhile ----------------------------------------------


class _EditingStep:
    """Stands for a slow step during which the listing changes (an event is applied)."""

    name: ClassVar[str] = "editing"
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, url: str, change: dict[str, Any]) -> None:
        self.url, self.change = url, change

    def version(self, settings: Settings) -> str:
        return "editing@1"

    def run(self, ctx: ImageContext) -> StepResult:
        apply(self.url, self.change)
        return StepResult(tags=[Tag("should-not-be-stored", 1.0, "test")])


@pytest.mark.parametrize("change", ["image removed", "listing deleted"])
def test_results_of_an_image_that_changed_during_inference_are_dropped(
        change: str, db_url: str, tmp_path: Path, make_settings, monkeypatch: pytest.MonkeyPatch) -> None:
    listing, a, b = unique("L"), photo(tmp_path / "a.png"), photo(tmp_path / "b.png", (1, 2, 3))
    out = apply(db_url, event(listing, [a]))
    follow_up = (event(listing, [b], etype="listing.updated") if change == "image removed"
                 else event(listing, [], etype="listing.deleted"))
    _register(monkeypatch, _EditingStep(db_url, follow_up))
    settings = make_settings(database_url=db_url, steps=["metadata", "editing"])
    (result,) = analyze_all(db_url, settings, out.images_to_analyze)
    assert (result.status, result.detail) == ("skipped", "changed while processing")
    assert count(db_url, m.Tag, m.Tag.listing_id == out.listing_id) == 0
    assert count(db_url, m.StepRunRecord, m.StepRunRecord.image_id == out.images_to_analyze[0]) == 0


# --- failures while storing ------------------------------------------------------------------


class _UnstorableStep:
    """A buggy step: its summary cannot be stored as JSON."""

    name: ClassVar[str] = "unstorable"
    requires: ClassVar[tuple[str, ...]] = ()

    def version(self, settings: Settings) -> str:
        return "unstorable@1"

    def run(self, ctx: ImageContext) -> StepResult:
        return StepResult(data={"oops": object()})


def test_a_bug_while_storing_fails_the_image_with_a_reason(db_url: str, tmp_path: Path, make_settings,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, _UnstorableStep())
    settings = make_settings(database_url=db_url, steps=["metadata", "unstorable"])
    out = apply(db_url, event(unique("L"), [photo(tmp_path / "a.png"), photo(tmp_path / "b.png", (1, 2, 3))]))
    results = analyze_all(db_url, settings, out.images_to_analyze)
    assert [r.status for r in results] == ["failed", "failed"]
    assert results[0].detail.startswith("internal_error: ") and "JSON serializable" in results[0].detail
    with session_factory(db_url)() as session:
        listing = session.get_one(m.Listing, out.listing_id)
        assert listing.status == "done"  # the listing is not stuck in processing
        assert all((img.error or "").startswith("internal_error:") for img in listing.images)
    # Nothing of the failed store is left half-written.
    assert count(db_url, m.StepRunRecord, m.StepRunRecord.image_id.in_(out.images_to_analyze)) == 0


class _TaggingProbe:
    name: ClassVar[str] = "probe"
    requires: ClassVar[tuple[str, ...]] = ()

    def version(self, settings: Settings) -> str:
        return "probe@1"

    def run(self, ctx: ImageContext) -> StepResult:
        return StepResult(tags=[Tag("probe-tag", 0.5, "test")], handoff="for the writer")


class _BrokenWriter:
    """Writes a row, then fails: the row must be undone with it, the other steps kept."""

    step: ClassVar[str] = "probe"

    def write(self, wctx: WriteContext, result: StepResult) -> StepResult:
        assert result.handoff == "for the writer"
        wctx.session.execute(insert(m.Tag), [{"listing_id": wctx.listing_id, "image_id": wctx.image_id,
                                              "name": "half-written", "score": 1.0, "source": "test",
                                              "model_version": "x"}])
        raise RuntimeError("writer bug")


def test_a_failing_writer_fails_its_step_only(db_url: str, tmp_path: Path, make_settings,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, _TaggingProbe())
    monkeypatch.setitem(writers.WRITER_REGISTRY, "probe", f"{__name__}:_BrokenWriter")
    monkeypatch.setitem(writers._instances, "probe", _BrokenWriter())
    settings = make_settings(database_url=db_url, steps=["metadata", "probe"])
    out = apply(db_url, event(unique("L"), [photo(tmp_path / "a.png")]))
    (result,) = analyze_all(db_url, settings, out.images_to_analyze)
    assert result.status == "done"
    assert [(r.step, r.status, r.error) for r in result.steps] == [
        ("metadata", "ok", None), ("probe", "failed", "RuntimeError: writer bug")]
    image_id = out.images_to_analyze[0]
    assert count(db_url, m.Tag, m.Tag.image_id == image_id) == 0  # neither the probe's nor the writer's
    with session_factory(db_url)() as session:
        stored = session.execute(select(m.StepRunRecord.step, m.StepRunRecord.status)
                                 .where(m.StepRunRecord.image_id == image_id)).all()
        assert sorted(stored) == [("metadata", "ok"), ("probe", "failed")]
        assert session.get_one(m.Image, image_id).phash is not None
