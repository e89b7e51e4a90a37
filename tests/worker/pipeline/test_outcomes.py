"""What the pipeline reports when analysis did not work out (issue 12, items 11, 12, 14, 15):
a listing none of whose images was analysed is never ``ok``, an image whose steps failed is
not plainly complete, images of a deleted listing end, and a database error is not logged as a
broken step."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import psycopg2
import pytest
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from db import models as m
from db.session import session_factory
from tests.support.pipeline import analyze_all, apply, event, photo
from tests.support.services import unique
from worker.config import Settings
from worker.pipeline import registry, writers
from worker.pipeline.analyze import analyze_image
from worker.pipeline.contract import Flag, ImageContext, StepResult
from worker.pipeline.writers import WriteContext


def _register(monkeypatch: pytest.MonkeyPatch, step: Any) -> None:
    monkeypatch.setitem(registry.STEP_REGISTRY, step.name, f"{__name__}:{type(step).__name__}")
    monkeypatch.setitem(registry._instances, step.name, step)


def _listing(url: str, listing_id: int) -> m.Listing:
    with session_factory(url)() as session:
        return session.get_one(m.Listing, listing_id)


def _images(url: str, listing_id: int) -> list[m.Image]:
    with session_factory(url)() as session:
        return list(session.execute(select(m.Image).where(m.Image.listing_id == listing_id)
                                    .order_by(m.Image.position)).scalars())


# --- item 11: a listing whose images were not analysed is never "ok" ---------------------------


def test_a_listing_whose_every_image_failed_is_incomplete_not_ok(db_url: str, tmp_path: Path,
                                                                  make_settings) -> None:
    settings = make_settings(database_url=db_url)
    (tmp_path / "text.jpg").write_text("not an image at all")
    out = apply(db_url, event(unique("L"), [str(tmp_path / "text.jpg"), str(tmp_path / "missing.jpg")]))
    assert [r.status for r in analyze_all(db_url, settings, out.images_to_analyze)] == ["failed", "failed"]
    listing = _listing(db_url, out.listing_id or 0)
    assert listing.status == "done"
    assert listing.fraud_decision == "incomplete"
    assert listing.fraud_score == 0.0  # the score of what was found: nothing


def test_one_failed_image_makes_an_otherwise_clean_listing_incomplete(db_url: str, tmp_path: Path,
                                                                      make_settings) -> None:
    settings = make_settings(database_url=db_url)
    out = apply(db_url, event(unique("L"), [photo(tmp_path / "a.png"), str(tmp_path / "missing.jpg")]))
    assert [r.status for r in analyze_all(db_url, settings, out.images_to_analyze)] == ["done", "failed"]
    assert _listing(db_url, out.listing_id or 0).fraud_decision == "incomplete"
    # Fully analysed and clean: ok (control).
    clean = apply(db_url, event(unique("L"), [photo(tmp_path / "b.png", (0, 90, 0))]))
    analyze_all(db_url, settings, clean.images_to_analyze)
    assert _listing(db_url, clean.listing_id or 0).fraud_decision == "ok"


class _NsfwProbe:
    """Stands for a check that found something serious."""

    name: ClassVar[str] = "nsfw_probe"
    requires: ClassVar[tuple[str, ...]] = ()

    def version(self, settings: Settings) -> str:
        return "nsfw-probe@1"

    def run(self, ctx: ImageContext) -> StepResult:
        return StepResult(flags=[Flag("nsfw", 1.0, {"summary": "test"})])


def test_what_was_found_still_decides_when_another_image_failed(db_url: str, tmp_path: Path, make_settings,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, _NsfwProbe())
    settings = make_settings(database_url=db_url, steps=["metadata", "nsfw_probe"])
    out = apply(db_url, event(unique("L"), [photo(tmp_path / "a.png"), str(tmp_path / "missing.jpg")]))
    analyze_all(db_url, settings, out.images_to_analyze)
    assert _listing(db_url, out.listing_id or 0).fraud_decision == "review"  # 0.7 >= 0.5: more than incomplete


# --- item 12: an image whose steps did not all run is not plainly complete ---------------------


class _BrokenStep:
    """Stands for a model that cannot run here (e.g. CATALOG_DEVICE=cuda without a GPU)."""

    name: ClassVar[str] = "broken"
    requires: ClassVar[tuple[str, ...]] = ()

    def version(self, settings: Settings) -> str:
        return "broken@1"

    def run(self, ctx: ImageContext) -> StepResult:
        raise RuntimeError("Found no NVIDIA driver on your system")


def test_an_image_with_a_failed_step_is_done_but_not_complete(db_url: str, tmp_path: Path, make_settings,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, _BrokenStep())
    out = apply(db_url, event(unique("L"), [photo(tmp_path / "a.png")]))
    (result,) = analyze_all(db_url, make_settings(database_url=db_url, steps=["metadata", "broken"]),
                            out.images_to_analyze)
    assert result.status == "done"
    (image,) = _images(db_url, out.listing_id or 0)
    assert image.status == "done" and image.complete is False and image.error is None
    assert _listing(db_url, out.listing_id or 0).fraud_decision == "incomplete"

    # The same bytes again with the step fixed: the failed step is not "kept", it runs again.
    monkeypatch.setattr(_BrokenStep, "run", lambda self, ctx: StepResult(data={"fixed": True}))
    again = apply(db_url, event(out_external(db_url, out.listing_id or 0), [image.url], etype="listing.updated"))
    (rerun,) = analyze_all(db_url, make_settings(database_url=db_url, steps=["metadata", "broken"]),
                           again.images_to_analyze)
    assert [(r.step, r.status) for r in rerun.steps] == [("metadata", "ok"), ("broken", "ok")]
    (image,) = _images(db_url, out.listing_id or 0)
    assert image.complete is True
    assert _listing(db_url, out.listing_id or 0).fraud_decision == "ok"


def out_external(url: str, listing_id: int) -> str:
    return _listing(url, listing_id).external_id


def test_failed_images_are_not_complete_and_complete_ones_are(db_url: str, tmp_path: Path, make_settings) -> None:
    settings = make_settings(database_url=db_url)
    out = apply(db_url, event(unique("L"), [photo(tmp_path / "a.png"), str(tmp_path / "missing.jpg")]))
    assert [img.complete for img in _images(db_url, out.listing_id or 0)] == [None, None]  # pending
    analyze_all(db_url, settings, out.images_to_analyze)
    assert [(img.status, img.complete) for img in _images(db_url, out.listing_id or 0)] == [
        ("done", True), ("failed", False)]


# --- item 15: images of a deleted listing get a final state ------------------------------------


def test_pending_images_of_a_deleted_listing_are_failed_with_listing_deleted(db_url: str, tmp_path: Path,
                                                                            make_settings) -> None:
    settings = make_settings(database_url=db_url)
    listing = unique("L")
    out = apply(db_url, event(listing, [photo(tmp_path / "a.png"), photo(tmp_path / "b.png", (0, 0, 99))]))
    analyze_all(db_url, settings, out.images_to_analyze[:1])  # one done, one still pending
    apply(db_url, event(listing, [], etype="listing.deleted"))
    done, gone = _images(db_url, out.listing_id or 0)
    assert done.status == "done" and done.error is None  # what was analysed stays
    assert gone.status == "failed" and (gone.error or "").startswith("listing_deleted: ")
    assert gone.processed_at is not None and gone.complete is False
    assert _listing(db_url, out.listing_id or 0).status == "deleted"
    # Its message, still queued, changes nothing.
    (late,) = analyze_all(db_url, settings, out.images_to_analyze[1:])
    assert late.status == "skipped"
    with session_factory(db_url)() as session:
        pending = session.execute(select(m.Image.id).where(m.Image.listing_id == out.listing_id,
                                                           m.Image.status == "pending")).all()
    assert pending == []


def test_a_pending_image_left_by_an_older_release_ends_when_its_task_runs(db_url: str, tmp_path: Path,
                                                                         make_settings) -> None:
    """Rows from before this rule (deleted listing, image still pending) end at their next run."""
    out = apply(db_url, event(unique("L"), [photo(tmp_path / "a.png")]))
    with session_factory(db_url)() as session, session.begin():
        session.get_one(m.Listing, out.listing_id).status = "deleted"
    (result,) = analyze_all(db_url, make_settings(database_url=db_url), out.images_to_analyze)
    assert result.status == "skipped"
    (image,) = _images(db_url, out.listing_id or 0)
    assert image.status == "failed" and (image.error or "").startswith("listing_deleted: ")


# --- item 14: a database error in the store is retried, not reported as a broken step ----------


class _Probe:
    name: ClassVar[str] = "probe"
    requires: ClassVar[tuple[str, ...]] = ()

    def version(self, settings: Settings) -> str:
        return "probe@1"

    def run(self, ctx: ImageContext) -> StepResult:
        return StepResult(data={"probe": True}, handoff="x")


class _FlakyWriter:
    """Fails with a database error the first time, like a dropped connection or a deadlock."""

    step: ClassVar[str] = "probe"

    def __init__(self, error: Exception) -> None:
        self.error: Exception | None = error

    def write(self, wctx: WriteContext, result: StepResult) -> StepResult:
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return result


def _connection_lost() -> DBAPIError:
    error = OperationalError("SELECT 1", {}, psycopg2.OperationalError("server closed the connection"))
    error.connection_invalidated = True
    return error


@pytest.mark.parametrize("error", [
    pytest.param(lambda: InterfaceError("SELECT 1", {}, psycopg2.InterfaceError("connection already closed")),
                 id="interface-error"),
    pytest.param(lambda: OperationalError("SELECT 1", {}, psycopg2.errors.DeadlockDetected("deadlock detected")),
                 id="deadlock"),
    pytest.param(_connection_lost, id="connection-lost"),
])
def test_a_database_error_in_a_writer_is_retried_and_not_logged_as_a_failed_step(
        error: Any, db_url: str, tmp_path: Path, make_settings, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    _register(monkeypatch, _Probe())
    flaky = _FlakyWriter(error())
    monkeypatch.setitem(writers.WRITER_REGISTRY, "probe", f"{__name__}:_FlakyWriter")
    monkeypatch.setitem(writers._instances, "probe", flaky)
    settings = make_settings(database_url=db_url, steps=["metadata", "probe"])
    out = apply(db_url, event(unique("L"), [photo(tmp_path / "a.png")]))
    (image_id,) = out.images_to_analyze
    caplog.set_level(logging.INFO)
    with session_factory(db_url)() as session, pytest.raises(DBAPIError):
        analyze_image(session, image_id, settings)  # the task retries it
    (image,) = _images(db_url, out.listing_id or 0)
    assert image.status == "pending" and image.error is None
    lies = [r.getMessage() for r in caplog.records if "failed" in r.getMessage() or "internal error" in r.getMessage()]
    assert lies == []
    retried = [r for r in caplog.records if "will be retried" in r.getMessage()]
    assert retried and all(r.levelno == logging.WARNING for r in retried)

    with session_factory(db_url)() as session:
        again = analyze_image(session, image_id, settings)
    assert again.status == "done" and [(r.step, r.status) for r in again.steps] == [("metadata", "ok"), ("probe", "ok")]


class _DbReadingStep:
    """A step that (against the contract) reached a database that is down."""

    name: ClassVar[str] = "db_reader"
    requires: ClassVar[tuple[str, ...]] = ()

    def version(self, settings: Settings) -> str:
        return "db-reader@1"

    def run(self, ctx: ImageContext) -> StepResult:
        raise OperationalError("SELECT 1", {}, psycopg2.OperationalError("could not connect to server"))


def test_a_database_error_in_a_step_is_retried_not_recorded_as_a_failed_step(
        db_url: str, tmp_path: Path, make_settings, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    _register(monkeypatch, _DbReadingStep())
    settings = make_settings(database_url=db_url, steps=["metadata", "db_reader"])
    (image_id,) = apply(db_url, event(unique("L"), [photo(tmp_path / "a.png")])).images_to_analyze
    caplog.set_level(logging.INFO)
    with session_factory(db_url)() as session, pytest.raises(OperationalError):
        analyze_image(session, image_id, settings)
    with session_factory(db_url)() as session:
        image = session.get_one(m.Image, image_id)
        assert (image.status, image.error, image.lease_owner) == ("pending", None, None)
    assert [r.getMessage() for r in caplog.records if "failed" in r.getMessage()] == []
    assert any("will be retried" in r.getMessage() for r in caplog.records)
