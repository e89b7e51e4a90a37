"""Several images of one listing in one run (``analyze_images``, the ``analyze_images`` task):
one claim and one store transaction for all of them, with per image the same outcomes, leases,
attempt counting and checks as ``analyze_image`` (issue 14: end-to-end overhead)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sqlalchemy import select

from db import models as m
from db.session import session_factory
from tests.support.pipeline import analyze_all, apply, count, event, photo
from tests.support.services import unique
from tests.worker.pipeline.test_statement_count import counted
from worker.config import Settings
from worker.io.errors import ImageLoadError
from worker.io.load import load_image
from worker.pipeline import analyze as analyze_module
from worker.pipeline import registry
from worker.pipeline.analyze import analyze_images, claim_images
from worker.pipeline.contract import ImageContext, StepResult
from worker.pipeline.lease import Holder

#: Statements of a first analysis of four images of one listing, metadata step only, the
#: listing's last images (so the listing is finished too), BEGIN/COMMIT not counted. One image at
#: a time the same work is 4 x 11 statements plus the listing's finish (test_statement_count).
BATCH_OF_FOUR_MAX = 15


def _run(url: str, settings: Settings, ids: list[int], holder: Holder | None = None) -> list[Any]:
    with session_factory(url)() as session:
        return analyze_images(session, ids, settings, max_attempts=3, holder=holder)


def _photos(tmp_path: Path, n: int) -> list[str]:
    return [photo(tmp_path / f"p{i}.png", (40 * i % 255, 200 - 30 * i, 90)) for i in range(n)]


def test_a_batch_stores_what_single_runs_store(db_url: str, tmp_path: Path, make_settings) -> None:
    settings = make_settings(database_url=db_url, steps=["metadata"])
    refs = _photos(tmp_path, 4)
    single = apply(db_url, event(unique("L"), refs))
    batch = apply(db_url, event(unique("L"), refs))
    assert [o.status for o in analyze_all(db_url, settings, single.images_to_analyze)] == ["done"] * 4
    outcomes = _run(db_url, settings, list(reversed(batch.images_to_analyze)))
    assert [o.image_id for o in outcomes] == list(reversed(batch.images_to_analyze))  # the caller's order
    assert [o.status for o in outcomes] == ["done"] * 4
    assert all(o.listing for o in outcomes)
    # The listing is finished once, and exactly one outcome says so (the task relays once).
    assert [o.decision for o in outcomes if o.decision is not None] == ["ok"]
    fields = ("status", "complete", "phash", "dhash", "sha256", "width", "height", "format", "attempts",
              "lease_owner", "lease_expires_at", "error")
    with session_factory(db_url)() as session:
        for a, b in zip(single.images_to_analyze, batch.images_to_analyze, strict=True):
            one, other = session.get_one(m.Image, a), session.get_one(m.Image, b)
            assert [getattr(one, f) for f in fields] == [getattr(other, f) for f in fields]
            assert other.processed_at is not None
        for listing_id in (single.listing_id, batch.listing_id):
            listing = session.get_one(m.Listing, listing_id)
            assert (listing.status, listing.fraud_decision) == ("done", "ok")
        assert session.execute(select(m.OutboxEvent.listing_id).where(
            m.OutboxEvent.listing_id == batch.listing_id)).scalars().all() in ([], [batch.listing_id])
    assert count(db_url, m.StepRunRecord, m.StepRunRecord.image_id.in_(batch.images_to_analyze)) == 4


def test_a_batch_costs_fewer_statements_than_single_runs(db_url: str, tmp_path: Path, make_settings) -> None:
    settings = make_settings(database_url=db_url, steps=["metadata"])
    out = apply(db_url, event(unique("L"), _photos(tmp_path, 4)))
    with counted(db_url) as statements:
        assert [o.status for o in _run(db_url, settings, out.images_to_analyze)] == ["done"] * 4
    kinds = [s.split(None, 1)[0] for s in statements]
    kinds = [k for k in kinds if k not in ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")]
    assert not [s for s in statements if s.startswith("DELETE") and "SEARCH_VECTORS" not in s]
    assert len(kinds) <= BATCH_OF_FOUR_MAX, " ".join(kinds)


def test_an_image_another_run_holds_is_skipped_and_the_others_are_stored(db_url: str, tmp_path: Path,
                                                                          make_settings) -> None:
    settings = make_settings(database_url=db_url, steps=["metadata"])
    out = apply(db_url, event(unique("L"), _photos(tmp_path, 3)))
    busy = out.images_to_analyze[1]
    with session_factory(db_url)() as session, session.begin():
        image = session.get_one(m.Image, busy)
        image.lease_owner, image.lease_expires_at = "other-task#0/abc", m.utcnow() + timedelta(seconds=60)
        image.attempts = 1
    outcomes = _run(db_url, settings, out.images_to_analyze, Holder("batch-1", 0))
    assert [o.status for o in outcomes] == ["done", "skipped", "done"]
    assert outcomes[1].detail.startswith("in flight")
    assert all(o.decision is None for o in outcomes)  # the busy image is still pending
    with session_factory(db_url)() as session:
        held = session.get_one(m.Image, busy)
        assert (held.status, held.attempts, held.lease_owner) == ("pending", 1, "other-task#0/abc")
        assert session.get_one(m.Listing, out.listing_id).status != "done"


def test_a_redelivered_batch_takes_its_images_over_and_counts_the_death(db_url: str, tmp_path: Path,
                                                                         make_settings) -> None:
    settings = make_settings(database_url=db_url, steps=["metadata"])
    out = apply(db_url, event(unique("L"), _photos(tmp_path, 2)))
    ids = out.images_to_analyze
    with session_factory(db_url)() as session:  # the first delivery claims, then its worker dies
        claims = claim_images(session, ids, settings, Holder("batch-7", 0), 3)
    tokens = {c.token for c in claims if not isinstance(c, analyze_module.ImageOutcome)}
    assert len(tokens) == 1  # one lease token for the batch
    with session_factory(db_url)() as session:
        assert {session.get_one(m.Image, i).lease_owner for i in ids} == tokens
    # A duplicate message (another task id) leaves the live leases alone.
    assert [o.status for o in _run(db_url, settings, ids, Holder("batch-8", 0))] == ["skipped"] * 2
    # The same message delivered again (reject_on_worker_lost): takes over, the death counts.
    assert [o.status for o in _run(db_url, settings, ids, Holder("batch-7", 0))] == ["done"] * 2
    with session_factory(db_url)() as session:
        assert [session.get_one(m.Image, i).attempts for i in ids] == [2, 2]
        assert session.get_one(m.Listing, out.listing_id).status == "done"


def test_a_transient_fetch_error_hands_that_image_back(db_url: str, tmp_path: Path, make_settings,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(database_url=db_url, steps=["metadata"])
    refs = _photos(tmp_path, 3)
    out = apply(db_url, event(unique("L"), refs))

    def flaky(url: str, settings: Settings) -> Any:
        if url == refs[0]:
            raise ImageLoadError("fetch_timeout", "no answer", transient=True)
        return load_image(url, settings)

    monkeypatch.setattr(analyze_module, "load_image", flaky)
    with session_factory(db_url)() as session:
        outcomes = analyze_images(session, out.images_to_analyze, settings, retry_transient=True)
    assert [o.status for o in outcomes] == ["retry", "done", "done"]
    with session_factory(db_url)() as session:
        first = session.get_one(m.Image, out.images_to_analyze[0])
        assert (first.status, first.lease_owner, first.lease_expires_at, first.attempts) == ("pending", None, None, 1)
        assert session.get_one(m.Listing, out.listing_id).status != "done"
    # Without retries left it fails like a single run would, and finishes the listing.
    with session_factory(db_url)() as session:
        (again,) = analyze_images(session, out.images_to_analyze[:1], settings, retry_transient=False)
    assert again.status == "failed" and again.detail.startswith("fetch_timeout:") and again.decision is not None


class _PickyStep:
    """Returns something the store cannot serialise, for one photo only."""

    name: ClassVar[str] = "picky"
    requires: ClassVar[tuple[str, ...]] = ()

    def version(self, settings: Settings) -> str:
        return "picky@1"

    def run(self, ctx: ImageContext) -> StepResult:
        return StepResult(data={"oops": object()} if ctx.url.endswith("p1.png") else {"fine": True})


def test_a_bug_storing_one_image_fails_only_that_image(db_url: str, tmp_path: Path, make_settings,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    step = _PickyStep()
    monkeypatch.setitem(registry.STEP_REGISTRY, step.name, f"{__name__}:_PickyStep")
    monkeypatch.setitem(registry._instances, step.name, step)
    settings = make_settings(database_url=db_url, steps=["metadata", "picky"])
    out = apply(db_url, event(unique("L"), _photos(tmp_path, 3)))
    outcomes = _run(db_url, settings, out.images_to_analyze)
    assert [o.status for o in outcomes] == ["done", "failed", "done"]
    assert outcomes[1].detail.startswith("internal_error: ")
    with session_factory(db_url)() as session:
        listing = session.get_one(m.Listing, out.listing_id)
        assert (listing.status, listing.fraud_decision) == ("done", "incomplete")
    bad = out.images_to_analyze[1]
    assert count(db_url, m.StepRunRecord, m.StepRunRecord.image_id == bad) == 0
    assert count(db_url, m.StepRunRecord, m.StepRunRecord.image_id.in_(out.images_to_analyze)) == 4


def test_an_image_that_changed_while_the_batch_worked_is_dropped(db_url: str, tmp_path: Path, make_settings,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(database_url=db_url, steps=["metadata"])
    out = apply(db_url, event(unique("L"), _photos(tmp_path, 2)))
    changed = out.images_to_analyze[0]
    real_compute = analyze_module._compute

    def compute_then_change(claim: Any, settings: Settings, retry_transient: bool) -> Any:
        result = real_compute(claim, settings, retry_transient)
        if claim.image_id == changed:  # a sweep declared the run dead and another run took over
            with session_factory(db_url)() as session, session.begin():
                session.get_one(m.Image, changed).lease_owner = "thief#0/123"
        return result

    monkeypatch.setattr(analyze_module, "_compute", compute_then_change)
    outcomes = _run(db_url, settings, out.images_to_analyze)
    assert [(o.status, o.detail) for o in outcomes] == [
        ("skipped", "lease taken over by another run"), ("done", "")]
    assert count(db_url, m.StepRunRecord, m.StepRunRecord.image_id == changed) == 0


def test_images_are_announced_in_groups(monkeypatch: pytest.MonkeyPatch, make_settings) -> None:
    from tasks import images

    sent: list[tuple[str, Any, Any]] = []
    monkeypatch.setattr(images.analyze_image, "delay", lambda i, **k: sent.append(("one", i, k)))
    monkeypatch.setattr(images.analyze_images, "delay", lambda ids, **k: sent.append(("many", ids, k)))
    images.announce_images([1, 2, 3, 4, 5], make_settings(images_per_task=2), event_id="ev")
    assert sent == [("many", [1, 2], {"event_id": "ev"}), ("many", [3, 4], {"event_id": "ev"}),
                    ("one", 5, {"event_id": "ev"})]
    sent.clear()
    images.announce_images([1, 2, 3], make_settings(images_per_task=1))
    assert sent == [("one", 1, {"event_id": None}), ("one", 2, {"event_id": None}), ("one", 3, {"event_id": None})]
