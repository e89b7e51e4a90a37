"""Analyse one image: read -> compute -> write.

1. **Claim** (one short transaction): count the attempt, read what the work needs (URL,
   listing, seller, category, what is stored from a previous run) into a plain
   :class:`Claim`; commit.
2. **Compute** (no transaction, no session in reach): fetch and decode the image, run the
   configured steps. Inference takes seconds per image on CPU; holding a transaction open
   meanwhile would leave idle-in-transaction connections, hold locks and drain the pool.
3. **Store** (one short transaction): lock the listing row, check that the image is still the
   one that was fetched (same URL, still pending, listing not deleted), replace its results
   (the step writers run here, e.g. the locked duplicate search), finish the image and, when it
   was the last one, the listing.

Idempotency rules live in ``worker.pipeline.store`` (results replaced as a whole, listing
completion decided under the listing lock) and ``worker.pipeline.events``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from db import models as m
from worker.config import Settings
from worker.io.errors import ImageLoadError
from worker.io.load import LoadedImage, load_image
from worker.pipeline.contract import ImageContext, StepRun
from worker.pipeline.registry import get_step, run_steps, safe_version
from worker.pipeline.store import clear_results, finish_image, lock_listing, store_runs
from worker.pipeline.writers import WriteContext, apply_writers

log = logging.getLogger(__name__)


@dataclass
class ImageOutcome:
    image_id: int
    status: str  # done | failed | skipped | retry
    detail: str = ""
    steps: list[StepRun] = field(default_factory=list)


@dataclass(frozen=True)
class Claim:
    """What the claim transaction read: plain values, so nothing after it can lazily load
    an attribute through the session (which would open a transaction during inference)."""

    image_id: int
    url: str
    listing_id: int
    seller_id: str
    category: str | None
    previous_sha256: str | None  # of the last successful analysis, if any
    previous_runs: frozenset[tuple[str, str]]  # (step, model version) stored by that analysis


def begin_attempt(session: Session, image_id: int, max_attempts: int, settings: Settings) -> m.Image | None:
    """Count an attempt before the work starts, so an image that kills its worker every
    time is failed after ``max_attempts`` instead of looping forever. Returns None when
    there is nothing to do (already finished, deleted, or the listing is deleted)."""
    image = session.get(m.Image, image_id)
    if image is None or image.status != "pending":
        return None
    if image.listing.status == "deleted":
        return None
    if image.attempts >= max_attempts:
        lock_listing(session, image.listing_id)  # listing before image, as everywhere else
        finish_image(session, image, status="failed",
                     error=f"gave_up: gave up after {image.attempts} attempts: the worker died or timed out "
                           "while processing this image", settings=settings)
        return None
    image.attempts += 1
    return image


def claim_image(session: Session, image_id: int, max_attempts: int, settings: Settings) -> Claim | None:
    """Phase 1, in its own transaction: count the attempt and read what the work needs."""
    with session.begin():
        image = begin_attempt(session, image_id, max_attempts, settings)
        if image is None:
            return None
        previously_done = image.processed_at is not None and image.error is None
        previous_runs: frozenset[tuple[str, str]] = frozenset()
        if previously_done:
            previous_runs = frozenset((step, version) for step, version in session.execute(
                select(m.StepRunRecord.step, m.StepRunRecord.model_version)
                .where(m.StepRunRecord.image_id == image_id)
            ))
        return Claim(image_id=image_id, url=image.url, listing_id=image.listing_id,
                     seller_id=image.listing.seller_id, category=image.listing.category,
                     previous_sha256=image.sha256 if previously_done else None,
                     previous_runs=previous_runs)


def analyze_image(session: Session, image_id: int, settings: Settings, *,
                  max_attempts: int = 3, retry_transient: bool = False) -> ImageOutcome:
    """Fetch, analyse and store one image (read -> compute -> write, see the module doc).

    ``session`` must not be in a transaction; each phase opens and commits its own.
    """
    claim = claim_image(session, image_id, max_attempts, settings)
    if claim is None:
        return ImageOutcome(image_id, "skipped", "not pending")

    try:
        loaded = load_image(claim.url, settings)
    except ImageLoadError as exc:
        if retry_transient and exc.transient:
            return ImageOutcome(image_id, "retry", str(exc))
        return _fail(session, claim, f"{exc.code}: {exc}", settings) or ImageOutcome(
            image_id, "skipped", "changed while fetching")

    try:
        if claim.previous_sha256 == loaded.sha256 and claim.previous_runs == _wanted_runs(settings):
            return _keep_previous(session, claim, settings)
        ctx = ImageContext(
            image_id=image_id, listing_id=claim.listing_id, seller_id=claim.seller_id,
            category=claim.category, url=claim.url, image=loaded.image, raw=loaded.raw,
            source_format=loaded.format, sha256=loaded.sha256, settings=settings,
        )
        runs = run_steps(ctx, settings.steps)
        return _store(session, claim, loaded, runs, settings)
    except (OperationalError, IntegrityError):
        raise  # transient database trouble: the task retries, the image stays pending
    except Exception as exc:  # a bug must fail this image with a reason, not loop forever
        log.exception("image %s: internal error while analysing or storing results", image_id)
        reason = f"internal_error: {type(exc).__name__}: {exc}"[:2000]
        return _fail(session, claim, reason, settings) or ImageOutcome(
            image_id, "skipped", "changed while processing")


def _store(session: Session, claim: Claim, loaded: LoadedImage, runs: list[StepRun],
           settings: Settings) -> ImageOutcome:
    """Phase 3: one short transaction that stores everything and finishes the image."""
    with session.begin():
        listing = lock_listing(session, claim.listing_id)
        image = session.get(m.Image, claim.image_id, populate_existing=True)
        if image is None or image.url != claim.url or image.status != "pending" or listing.status == "deleted":
            return ImageOutcome(claim.image_id, "skipped", "changed while processing")
        clear_results(session, claim.image_id)
        wctx = WriteContext(session=session, image_id=image.id, listing_id=listing.id,
                            seller_id=listing.seller_id, settings=settings)
        runs = apply_writers(wctx, runs)
        store_runs(session, image, runs)
        finish_image(session, image, status="done", error=None, loaded=loaded, settings=settings)
    return ImageOutcome(claim.image_id, "done", steps=runs)


def _keep_previous(session: Session, claim: Claim, settings: Settings) -> ImageOutcome:
    """Same bytes, same steps and model versions as the stored results: keep them."""
    with session.begin():
        lock_listing(session, claim.listing_id)
        image = session.get(m.Image, claim.image_id, populate_existing=True)
        if image is not None and image.url == claim.url and image.status == "pending":
            finish_image(session, image, status="done", error=None, settings=settings)
    return ImageOutcome(claim.image_id, "done", "unchanged bytes: previous results kept")


def _fail(session: Session, claim: Claim, reason: str, settings: Settings) -> ImageOutcome | None:
    """Fail the image with ``reason`` unless it changed meanwhile (then None)."""
    with session.begin():
        lock_listing(session, claim.listing_id)
        image = session.get(m.Image, claim.image_id, populate_existing=True)
        if image is None or image.url != claim.url or image.status != "pending":
            return None
        clear_results(session, claim.image_id)
        finish_image(session, image, status="failed", error=reason, settings=settings)
    return ImageOutcome(claim.image_id, "failed", reason)


def _wanted_runs(settings: Settings) -> frozenset[tuple[str, str]]:
    """The (step, version) pairs the configured pipeline would store now. If they differ
    from the stored ones, unchanged bytes are analysed again (a new model re-tags old
    photos). Computed outside any transaction: a version may hash a weights file."""
    return frozenset((name, safe_version(get_step(name), settings)) for name in settings.steps)
