"""Leases on images being analysed (issue 12, item 8): taken at claim, renewed by a heartbeat,
re-queued by the sweep soon after they run out, counted once, and never letting a run whose
lease was taken over write."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from db import models as m
from db.session import get_engine, session_factory
from tests.support.pipeline import analyze_all, apply, event, photo
from tests.support.services import unique
from worker.config import load_settings
from worker.io.load import load_image
from worker.pipeline.analyze import Claim, ImageOutcome, _store, claim_image
from worker.pipeline.lease import Heartbeat, Holder, LeaseCheck, check_lease, token_holder
from worker.pipeline.registry import run_steps
from worker.pipeline.sweep import Sweeper, requeue_expired_leases, stale_images


def _image(url: str, image_id: int) -> m.Image:
    with session_factory(url)() as session:
        return session.get_one(m.Image, image_id)


def _claim(url: str, image_id: int, settings: object, holder: Holder) -> Claim | ImageOutcome:
    with session_factory(url)() as session:
        return claim_image(session, image_id, settings, holder, max_attempts=3)  # type: ignore[arg-type]


def _expire(url: str, image_id: int) -> None:
    with session_factory(url)() as session, session.begin():
        session.execute(update(m.Image).where(m.Image.id == image_id)
                        .values(lease_expires_at=m.utcnow() - timedelta(seconds=1)))


def test_tokens_name_the_message_and_its_run() -> None:
    holder = Holder("5f1c-task", 2)
    token = holder.new_token()
    assert token_holder(token) == ("5f1c-task", 2) and token != holder.new_token()
    assert token_holder("no token") is None
    now = m.utcnow()
    later, earlier = now + timedelta(seconds=60), now - timedelta(seconds=1)
    assert check_lease(None, None, now, holder) == LeaseCheck(busy=False, died=False)
    other = Holder("other-task").new_token()
    assert (check_lease(other, later, now, holder).busy, check_lease(other, earlier, now, holder).died) == (True, True)
    assert check_lease(other, None, now, holder).died  # re-queued after its run died
    # The same message: its earlier run handed over to a retry; the same run died (redelivered).
    assert check_lease(Holder("5f1c-task", 1).new_token(), later, now, holder) == LeaseCheck(busy=False, died=False)
    assert check_lease(Holder("5f1c-task", 2).new_token(), later, now, holder) == LeaseCheck(busy=False, died=True)


def test_claim_takes_a_lease_and_finishing_releases_it(db_url: str, tmp_path: Path, make_settings) -> None:
    settings = make_settings(database_url=db_url, lease_seconds=120)
    out = apply(db_url, event(unique("L"), [photo(tmp_path / "a.png")]))
    (image_id,) = out.images_to_analyze
    claim = _claim(db_url, image_id, settings, Holder("task-1"))
    assert isinstance(claim, Claim)
    image = _image(db_url, image_id)
    assert image.lease_owner == claim.token and image.attempts == 1
    assert image.lease_expires_at is not None
    remaining = (image.lease_expires_at.replace(tzinfo=None) - m.utcnow().replace(tzinfo=None)).total_seconds()
    assert 100 < remaining <= 120
    # Another message for it while the lease is live: skipped, nothing counted.
    busy = _claim(db_url, image_id, settings, Holder("task-2"))
    assert isinstance(busy, ImageOutcome) and busy.detail.startswith("in flight")
    assert _image(db_url, image_id).attempts == 1


def test_a_run_whose_lease_was_taken_over_cannot_write(db_url: str, tmp_path: Path, make_settings) -> None:
    settings = make_settings(database_url=db_url)
    out = apply(db_url, event(unique("L"), [photo(tmp_path / "a.png")]))
    (image_id,) = out.images_to_analyze
    slow = _claim(db_url, image_id, settings, Holder("slow-task"))
    assert isinstance(slow, Claim)
    _expire(db_url, image_id)  # it stopped renewing (a frozen process)
    with session_factory(db_url)() as session, session.begin():
        assert requeue_expired_leases(session) == [image_id]
    fresh = _claim(db_url, image_id, settings, Holder("requeued-task"))
    assert isinstance(fresh, Claim)
    assert _image(db_url, image_id).attempts == 2  # the dead run counted once, by this claim

    loaded = load_image(slow.url, settings)  # the slow run finishes its work and tries to store
    from worker.pipeline.contract import ImageContext

    ctx = ImageContext(image_id=image_id, listing_id=slow.listing_id, seller_id=slow.seller_id, category=None,
                       url=slow.url, image=loaded.image, raw=loaded.raw, source_format=loaded.format,
                       sha256=loaded.sha256, settings=settings)
    with session_factory(db_url)() as session:
        refused = _store(session, slow, loaded, run_steps(ctx, settings.steps), settings)
    assert (refused.status, refused.detail) == ("skipped", "lease taken over by another run")
    image = _image(db_url, image_id)
    assert image.status == "pending" and image.lease_owner == fresh.token and image.sha256 is None


def test_expired_leases_are_requeued_once_and_the_death_counts_at_the_next_claim(
        db_url: str, tmp_path: Path, make_settings) -> None:
    settings = make_settings(database_url=db_url)
    out = apply(db_url, event(unique("L"), [photo(tmp_path / "a.png"), photo(tmp_path / "b.png", (9, 9, 9))]))
    dead, live = out.images_to_analyze
    assert isinstance(_claim(db_url, dead, settings, Holder("killed-task")), Claim)
    assert isinstance(_claim(db_url, live, settings, Holder("running-task")), Claim)
    _expire(db_url, dead)
    factory = session_factory(db_url)
    with factory() as session, session.begin():
        assert requeue_expired_leases(session) == [dead]  # not the live one
    with factory() as session, session.begin():
        assert requeue_expired_leases(session) == []  # once
    image = _image(db_url, dead)
    assert image.lease_owner is not None and image.lease_expires_at is None  # the death is remembered
    # Nor does the stale sweep take it again before CATALOG_STALE_AFTER: it was just touched.
    with factory() as session, session.begin():
        assert dead not in stale_images(session, timedelta(seconds=settings.stale_after))
    (result,) = analyze_all(db_url, settings, [dead])
    assert result.status == "done"
    image = _image(db_url, dead)
    assert (image.attempts, image.lease_owner, image.lease_expires_at) == (2, None, None)


def test_the_heartbeat_renews_the_lease_and_stops_when_it_is_gone(db_url: str, tmp_path: Path,
                                                                  make_settings) -> None:
    settings = make_settings(database_url=db_url, lease_seconds=10)
    out = apply(db_url, event(unique("L"), [photo(tmp_path / "a.png")]))
    (image_id,) = out.images_to_analyze
    claim = _claim(db_url, image_id, settings, Holder("task"))
    assert isinstance(claim, Claim)
    first = _image(db_url, image_id).lease_expires_at
    beat = Heartbeat(get_engine(db_url), image_id, claim.token, lease_seconds=10)
    beat.interval = 0.05
    with beat:
        deadline = time.monotonic() + 10
        while beat.renewals < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        renewed = _image(db_url, image_id).lease_expires_at
        assert beat.renewals >= 2 and renewed is not None and first is not None and renewed > first
        with session_factory(db_url)() as session, session.begin():  # an event replaced the image
            session.execute(update(m.Image).where(m.Image.id == image_id).values(lease_owner=None))
        while not beat.lost and time.monotonic() < deadline:
            time.sleep(0.02)
    assert beat.lost


def test_every_worker_sweeps_expired_leases_on_its_own(db_url: str, tmp_path: Path, make_settings) -> None:
    settings = make_settings(database_url=db_url, lease_sweep_seconds=1)
    out = apply(db_url, event(unique("L"), [photo(tmp_path / "a.png")]))
    (image_id,) = out.images_to_analyze
    assert isinstance(_claim(db_url, image_id, settings, Holder("killed")), Claim)
    announced: list[int] = []
    sweeper = Sweeper(settings, announced.append)
    sweeper.start()
    try:
        time.sleep(0.5)
        assert announced == []  # the lease is live: nothing to do
        _expire(db_url, image_id)
        deadline = time.monotonic() + 10
        while not announced and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sweeper.stop()
    assert announced == [image_id] and sweeper.sweeps >= 2


def test_recovery_after_a_worker_kill_is_bounded_well_under_five_minutes_by_default() -> None:
    """The worst case with the defaults: the run renewed just before dying, the lease runs out
    CATALOG_LEASE_SECONDS later, a sweep notices within CATALOG_LEASE_SWEEP_SECONDS."""
    defaults = load_settings()
    worst = defaults.lease_seconds + defaults.lease_sweep_seconds
    assert worst <= 150 < 300
    assert defaults.visibility_timeout == 7200  # what it waited before


@pytest.mark.parametrize("lease_seconds", [9])
def test_leases_shorter_than_ten_seconds_are_refused(lease_seconds: int) -> None:
    from worker.config import ConfigError

    with pytest.raises(ConfigError, match="CATALOG_LEASE_SECONDS"):
        load_settings(lease_seconds=lease_seconds)
