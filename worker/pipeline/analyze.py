"""Domain logic behind the Celery tasks: apply events, analyse images, finish listings.

Everything here takes a SQLAlchemy session and is called by thin task wrappers (tasks/) or
in-process by `catalog process`. Idempotency rules, in one place:

* an event id is recorded in ``processed_events`` in the same transaction as its effects, so a
  redelivered event changes nothing (it only re-announces images still pending);
* an image's results are replaced as a whole inside one transaction (old rows deleted, new rows
  inserted), so re-running an image never duplicates rows;
* "is the listing finished?" is decided while holding the listing row lock, so two images that
  finish at the same moment cannot both miss (or both take) the transition.
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
from worker.pipeline.registry import get_step, run_steps
from worker.pipeline.store import clear_results, finish_image, lock_listing, store_runs

log = logging.getLogger(__name__)


@dataclass
class ImageOutcome:
    image_id: int
    status: str  # done | failed | skipped | retry
    detail: str = ""
    steps: list[StepRun] = field(default_factory=list)


def begin_attempt(session: Session, image_id: int, max_attempts: int,
                  settings: Settings | None = None) -> m.Image | None:
    """Count an attempt before the work starts, so an image that kills its worker every
    time is failed after ``max_attempts`` instead of looping forever. Returns None when
    there is nothing to do (already finished, deleted, or the listing is deleted)."""
    image = session.get(m.Image, image_id)
    if image is None or image.status != "pending":
        return None
    if image.listing.status == "deleted":
        return None
    if image.attempts >= max_attempts:
        finish_image(session, image, status="failed",
                      error=f"gave_up: gave up after {image.attempts} attempts: the worker died or timed out "
                            "while processing this image", settings=settings)
        return None
    image.attempts += 1
    return image


def analyze_image(session: Session, image_id: int, settings: Settings, *,
                  max_attempts: int = 3, retry_transient: bool = False) -> ImageOutcome:
    """Fetch, analyse and store one image. Commits the attempt counter first, then does the
    slow work outside any write lock, then writes everything in one transaction."""
    with session.begin():
        image = begin_attempt(session, image_id, max_attempts, settings)
        if image is None:
            return ImageOutcome(image_id, "skipped", "not pending")
        url, listing_id = image.url, image.listing_id
        seller_id, category = image.listing.seller_id, image.listing.category
        previous_sha, previously_done = image.sha256, image.processed_at is not None and image.error is None

    try:
        loaded = load_image(url, settings)
    except ImageLoadError as exc:
        if retry_transient and exc.transient:
            return ImageOutcome(image_id, "retry", str(exc))
        with session.begin():
            image = session.get(m.Image, image_id)
            if image is None or image.url != url or image.status != "pending":
                return ImageOutcome(image_id, "skipped", "changed while fetching")
            clear_results(session, image_id)
            finish_image(session, image, status="failed", error=f"{exc.code}: {exc}", settings=settings)
        return ImageOutcome(image_id, "failed", f"{exc.code}: {exc}")

    try:
        return _analyze_loaded(session, image_id, url, listing_id, seller_id, category,
                               previously_done, previous_sha, loaded, settings)
    except (OperationalError, IntegrityError):
        raise  # transient database trouble: the task retries, the image stays pending
    except Exception as exc:  # a bug must fail this image with a reason, not loop forever
        log.exception("image %s: internal error while storing results", image_id)
        reason = f"internal_error: {type(exc).__name__}: {exc}"[:2000]
        with session.begin():
            image = session.get(m.Image, image_id)
            if image is not None and image.status == "pending":
                clear_results(session, image_id)
                finish_image(session, image, status="failed", error=reason, settings=settings)
        return ImageOutcome(image_id, "failed", reason)


def _analyze_loaded(session: Session, image_id: int, url: str, listing_id: int, seller_id: str,
                    category: str | None, previously_done: bool, previous_sha: str | None,
                    loaded: LoadedImage, settings: Settings) -> ImageOutcome:
    with session.begin():
        if previously_done and previous_sha == loaded.sha256 and _same_pipeline(session, image_id, settings):
            image = session.get(m.Image, image_id)
            if image is not None and image.status == "pending":
                finish_image(session, image, status="done", error=None, settings=settings)
            return ImageOutcome(image_id, "done", "unchanged bytes: previous results kept")

        ctx = ImageContext(
            image_id=image_id, listing_id=listing_id, seller_id=seller_id, category=category,
            url=url, image=loaded.image, raw=loaded.raw, source_format=loaded.format,
            sha256=loaded.sha256, settings=settings, db=session,
        )
        runs = run_steps(ctx, settings.steps)

        lock_listing(session, listing_id)
        image = session.get(m.Image, image_id, populate_existing=True)
        if image is None or image.url != url or image.status != "pending":
            return ImageOutcome(image_id, "skipped", "changed while processing")
        clear_results(session, image_id)
        store_runs(session, image, loaded, runs, ctx)
        finish_image(session, image, status="done", error=None, loaded=loaded, settings=settings)
    return ImageOutcome(image_id, "done", steps=runs)


def _same_pipeline(session: Session, image_id: int, settings: Settings) -> bool:
    """Did the stored results come from the steps and model versions configured now? If not,
    unchanged bytes are analysed again (a new model version re-tags old photos)."""
    stored = {(step, version) for step, version in session.execute(
        select(m.StepRunRecord.step, m.StepRunRecord.model_version)
        .where(m.StepRunRecord.image_id == image_id)
    )}
    wanted = {(name, _version_of(name, settings)) for name in settings.steps}
    return stored == wanted


def _version_of(name: str, settings: Settings) -> str:
    try:
        return get_step(name).version(settings)
    except Exception:  # noqa: BLE001 - a step that cannot even report a version
        return "unknown"
