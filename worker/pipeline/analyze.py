"""Analyse one image: read -> compute -> write.

1. **Claim** (one short transaction): lock the listing, then the image; take the image's
   lease (``worker.pipeline.lease``) and count the attempt; read what the work needs (URL,
   listing, seller, category, what is stored from a previous run) into a plain
   :class:`Claim`; commit. An image whose lease a live run of another message holds is
   skipped without counting anything: a duplicate message never restarts work in flight.
2. **Compute** (no transaction, no session in reach): fetch and decode the image, run the
   configured steps, while a heartbeat thread renews the lease. Inference takes seconds per
   image on CPU; holding a transaction open meanwhile would leave idle-in-transaction
   connections, hold locks and drain the pool.
3. **Store** (one short transaction): lock the listing row, then the image; check that the
   image is still the one that was fetched (same URL, still pending, listing not deleted) and
   still carries this run's lease; replace its results (the step writers run here, e.g. the
   locked duplicate search), finish the image (``complete`` when every step ran ok) and, when
   it was the last one, the listing.

**Attempts.** ``images.attempts`` counts the runs that really started (claims). An image is
given up (``gave_up``) only when a run finds that the previous one died -- its lease was left
behind -- and ``CATALOG_MAX_ATTEMPTS`` runs have started: an image that kills its worker every
time ends, while runs that ended normally (a fetch retried later, a database error retried by
the task) are never mistaken for deaths.

A database error anywhere (unreachable, connection lost, deadlock, lock timeout, an insert
race) propagates to the task, which retries; it is logged as that, never as a failed step or
an internal error. Idempotency rules live in ``worker.pipeline.store`` and
``worker.pipeline.events``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import models as m
from worker.config import Settings
from worker.io.errors import ImageLoadError
from worker.io.load import LoadedImage, load_image
from worker.observe import metrics, report
from worker.pipeline.contract import ImageContext, StepRun
from worker.pipeline.lease import Heartbeat, Holder, check_lease, db_now, engine_of, release
from worker.pipeline.registry import get_step, run_steps, safe_version
from worker.pipeline.store import (
    LISTING_DELETED,
    clear_results,
    finish_image,
    has_stored_results,
    is_retryable_db_error,
    lock_image,
    lock_listing,
    store_runs,
)
from worker.pipeline.writers import WriteContext, apply_writers
from worker.search.vectors import store_image_vectors

log = logging.getLogger(__name__)


@dataclass
class ImageOutcome:
    image_id: int
    status: str  # done | failed | skipped | retry
    detail: str = ""
    steps: list[StepRun] = field(default_factory=list)
    listing: str | None = None  # the listing's external id, where the run got that far
    decision: str | None = None  # the listing's fraud decision when this run finished the listing


@dataclass(frozen=True)
class Claim:
    """What the claim transaction read: plain values, so nothing after it can lazily load
    an attribute through the session (which would open a transaction during inference)."""

    image_id: int
    url: str
    listing_id: int
    seller_id: str
    category: str | None
    previous_sha256: str | None  # of the last complete analysis, if any
    previous_runs: frozenset[tuple[str, str]]  # (step, model version) that analysis ran ok
    token: str  # this run's lease (images.lease_owner)
    listing_external_id: str = ""


def claim_image(session: Session, image_id: int, settings: Settings, holder: Holder,
                max_attempts: int) -> Claim | ImageOutcome:
    """Phase 1, in its own transaction: take the lease, count the attempt, read what the work
    needs. Returns a ``skipped`` outcome when there is nothing to do (already finished, listing
    deleted, given up, or a live run of another message holds the image)."""
    with session.begin():
        listing_id = session.execute(select(m.Image.listing_id).where(m.Image.id == image_id)).scalar()
        if listing_id is None:
            return ImageOutcome(image_id, "skipped", "no such image (removed from its listing)")
        listing = lock_listing(session, listing_id)  # listing first, then the image
        image = lock_image(session, image_id)
        if image is None or image.status != "pending":
            return ImageOutcome(image_id, "skipped", "not pending", listing=listing.external_id)
        if listing.status == "deleted":  # a row left pending by an older release
            finish_image(session, image, status="failed", error=LISTING_DELETED, settings=settings)
            return ImageOutcome(image_id, "skipped", "listing deleted", listing=listing.external_id)
        now = db_now(session)
        lease = check_lease(image.lease_owner, image.lease_expires_at, now, holder)
        if lease.busy:
            return ImageOutcome(image_id, "skipped", "in flight: another run holds its lease",
                                listing=listing.external_id)
        if lease.died and image.attempts >= max_attempts:
            reason = (f"gave_up: {image.attempts} attempts started and the last one did not finish: "
                      "the worker died or timed out while processing this image")
            finish_image(session, image, status="failed", error=reason, settings=settings)
            return ImageOutcome(image_id, "failed", reason, listing=listing.external_id)
        if lease.died:
            log.warning("image %s: its previous run did not finish (worker died or timed out); "
                        "attempt %d of %d", image_id, image.attempts + 1, max_attempts)
        image.attempts += 1
        token = holder.new_token()
        image.lease_owner = token
        image.lease_expires_at = now + timedelta(seconds=settings.lease_seconds)
        previously_done = image.processed_at is not None and image.error is None
        previous_runs: frozenset[tuple[str, str]] = frozenset()
        if previously_done:  # only steps that ran ok: a failed one is never "kept"
            previous_runs = frozenset((step, version) for step, version in session.execute(
                select(m.StepRunRecord.step, m.StepRunRecord.model_version)
                .where(m.StepRunRecord.image_id == image_id, m.StepRunRecord.status == "ok")
            ))
        return Claim(image_id=image_id, url=image.url, listing_id=listing.id,
                     seller_id=listing.seller_id, category=listing.category,
                     previous_sha256=image.sha256 if previously_done else None,
                     previous_runs=previous_runs, token=token, listing_external_id=listing.external_id)


def analyze_image(session: Session, image_id: int, settings: Settings, *, max_attempts: int = 3,
                  retry_transient: bool = False, holder: Holder | None = None,
                  event_id: str | None = None) -> ImageOutcome:
    """Fetch, analyse and store one image (read -> compute -> write, see the module doc).

    ``session`` must not be in a transaction; each phase opens and commits its own. ``holder``
    names the message this run belongs to (the task id and retry count); by default a one-off
    run that never takes over another's lease. ``event_id``: the event that announced the
    image, when known (for the log line).
    """
    elapsed = metrics.timer()
    with metrics.image_in_flight():
        outcome = _analyze(session, image_id, settings, max_attempts, retry_transient, holder)
    report.image_finished(image_id=image_id, listing=outcome.listing, event_id=event_id, status=outcome.status,
                          detail=outcome.detail, decision=outcome.decision, seconds=elapsed())
    return outcome


def _analyze(session: Session, image_id: int, settings: Settings, max_attempts: int,
             retry_transient: bool, holder: Holder | None) -> ImageOutcome:
    claim = claim_image(session, image_id, settings, holder or Holder.one_off(), max_attempts)
    if isinstance(claim, ImageOutcome):
        return claim
    try:
        outcome = _work(session, claim, settings, retry_transient)
        outcome.listing = claim.listing_external_id
        return outcome
    except Exception as exc:
        if not is_retryable_db_error(exc):
            raise
        # Not a broken image or step: the task runs the whole analysis again.
        log.warning("image %s: database error (%s: %s); its analysis will be retried",
                    image_id, type(exc).__name__, (str(exc).splitlines() or [""])[0])
        _release_quietly(session, claim)
        raise


@dataclass
class _Computed:
    """What phase 2 produced: results to store, or a reason to fail, or a retry."""

    loaded: LoadedImage | None = None
    runs: list[StepRun] | None = None  # None with ``loaded``: keep the previous results
    failure: str | None = None
    retry: str | None = None


def _work(session: Session, claim: Claim, settings: Settings, retry_transient: bool) -> ImageOutcome:
    with Heartbeat(engine_of(session), claim.image_id, claim.token, settings.lease_seconds):
        computed = _compute(claim, settings, retry_transient)
    # The heartbeat stops before the write: the lease still has at least three quarters of
    # CATALOG_LEASE_SECONDS to run, and the write checks it under the row lock anyway.
    if computed.retry is not None:
        _release(session, claim)  # the retry is a new run, not a death
        return ImageOutcome(claim.image_id, "retry", computed.retry)
    if computed.failure is not None or computed.loaded is None:
        reason = computed.failure or "internal_error: nothing was loaded"
        return _fail(session, claim, reason, settings) or ImageOutcome(
            claim.image_id, "skipped", "changed while processing")
    try:
        if computed.runs is None:
            return _keep_previous(session, claim, settings)
        return _store(session, claim, computed.loaded, computed.runs, settings)
    except Exception as exc:
        if is_retryable_db_error(exc):
            raise  # transient database trouble: the task retries, the image stays pending
        # A bug must fail this image with a reason, not loop forever.
        log.exception("image %s: internal error while storing results", claim.image_id)
        return _fail(session, claim, _internal_error(exc), settings) or ImageOutcome(
            claim.image_id, "skipped", "changed while processing")


def _compute(claim: Claim, settings: Settings, retry_transient: bool) -> _Computed:
    """Phase 2: no transaction, no session."""
    try:
        loaded = load_image(claim.url, settings)
    except ImageLoadError as exc:
        if retry_transient and exc.transient:
            return _Computed(retry=str(exc))
        return _Computed(failure=f"{exc.code}: {exc}")
    try:
        if claim.previous_sha256 == loaded.sha256 and claim.previous_runs == _wanted_runs(settings):
            return _Computed(loaded=loaded)
        ctx = ImageContext(
            image_id=claim.image_id, listing_id=claim.listing_id, seller_id=claim.seller_id,
            category=claim.category, url=claim.url, image=loaded.image, raw=loaded.raw,
            source_format=loaded.format, sha256=loaded.sha256, settings=settings,
        )
        return _Computed(loaded=loaded, runs=run_steps(ctx, settings.steps))
    except Exception as exc:  # a bug must fail this image with a reason, not loop forever
        if is_retryable_db_error(exc):
            raise
        log.exception("image %s: internal error while analysing", claim.image_id)
        return _Computed(failure=_internal_error(exc))


def _internal_error(exc: Exception) -> str:
    return f"internal_error: {type(exc).__name__}: {exc}"[:2000]


def _held_image(session: Session, claim: Claim) -> tuple[m.Listing, m.Image] | str:
    """In a store transaction: lock the listing, then the image; the image if it is still the
    one this run claimed (same URL, pending, listing not deleted, still this run's lease), else
    why not."""
    listing = lock_listing(session, claim.listing_id)
    image = lock_image(session, claim.image_id)
    if image is None or image.url != claim.url or image.status != "pending" or listing.status == "deleted":
        return "changed while processing"
    if image.lease_owner != claim.token:
        log.warning("image %s: another run took its lease over while this one worked (it was "
                    "declared dead); this run's results are dropped", claim.image_id)
        return "lease taken over by another run"
    return listing, image


def _store(session: Session, claim: Claim, loaded: LoadedImage, runs: list[StepRun],
           settings: Settings) -> ImageOutcome:
    """Phase 3: one short transaction that stores everything and finishes the image."""
    with session.begin():
        held = _held_image(session, claim)
        if isinstance(held, str):
            return ImageOutcome(claim.image_id, "skipped", held)
        listing, image = held
        if has_stored_results(image):  # a first analysis has nothing to clear
            clear_results(session, claim.image_id)
        wctx = WriteContext(session=session, image_id=image.id, listing_id=listing.id,
                            seller_id=listing.seller_id, settings=settings)
        runs = apply_writers(wctx, runs)
        # The image row is written once, by finish_image: no autoflush of the hashes before.
        with session.no_autoflush:
            store_runs(session, image, runs)
            store_image_vectors(session, settings, image_id=image.id, listing_id=listing.id, runs=runs)
        complete = all(run.status == "ok" for run in runs) and {run.step for run in runs} >= set(settings.steps)
        finish_image(session, image, status="done", error=None, loaded=loaded, settings=settings,
                     complete=complete, listing=listing)
        decision = _decision(listing)
    detail = "" if complete else "incomplete: " + ", ".join(
        f"{run.step} {run.status}" for run in runs if run.status != "ok")
    return ImageOutcome(claim.image_id, "done", detail, steps=runs, decision=decision)


def _decision(listing: m.Listing) -> str | None:
    """The listing's fraud decision if it is finished (for the image's log line), else None."""
    return listing.fraud_decision if listing.status == "done" else None


def _keep_previous(session: Session, claim: Claim, settings: Settings) -> ImageOutcome:
    """Same bytes, and every configured step ran ok with the same model version on them: keep
    the stored results (complete by construction: only steps that ran ok are compared)."""
    with session.begin():
        held = _held_image(session, claim)
        if isinstance(held, str):
            return ImageOutcome(claim.image_id, "skipped", held)
        finish_image(session, held[1], status="done", error=None, settings=settings, complete=True,
                     listing=held[0])
        decision = _decision(held[0])
    return ImageOutcome(claim.image_id, "done", "unchanged bytes: previous results kept", decision=decision)


def _fail(session: Session, claim: Claim, reason: str, settings: Settings) -> ImageOutcome | None:
    """Fail the image with ``reason`` unless it changed meanwhile (then None)."""
    with session.begin():
        held = _held_image(session, claim)
        if isinstance(held, str):
            return None
        if has_stored_results(held[1]):
            clear_results(session, claim.image_id)
        finish_image(session, held[1], status="failed", error=reason, settings=settings, listing=held[0])
        decision = _decision(held[0])
    return ImageOutcome(claim.image_id, "failed", reason, decision=decision)


def _release(session: Session, claim: Claim) -> None:
    """Give the lease up (listing locked first, like every writer of image rows)."""
    with session.begin():
        lock_listing(session, claim.listing_id)
        release(session, claim.image_id, claim.token)


def _release_quietly(session: Session, claim: Claim) -> None:
    """After a database error: give the lease up if the database lets us. If not, nothing is
    lost: the task's retry (the same message) takes its own lease over, and otherwise the
    lease runs out and the sweep re-queues the image."""
    try:
        session.rollback()
        _release(session, claim)
    except Exception as exc:  # noqa: BLE001 - the database is the problem; the retry handles it
        log.info("image %s: lease not released (%s); the retry takes it over", claim.image_id,
                 type(exc).__name__)


def _wanted_runs(settings: Settings) -> frozenset[tuple[str, str]]:
    """The (step, version) pairs the configured pipeline would store now. If they differ
    from the stored ones, unchanged bytes are analysed again (a new model re-tags old
    photos). Computed outside any transaction: a version may hash a weights file."""
    return frozenset((name, safe_version(get_step(name), settings)) for name in settings.steps)
