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
from datetime import datetime, timedelta, timezone

import numpy as np
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from db import models as m
from worker.config import Settings
from worker.events import ListingEvent
from worker.hashing import to_signed64
from worker.imageio import ImageLoadError, LoadedImage, load_image
from worker.pipeline import ImageContext, StepRun, get_step, run_steps

log = logging.getLogger(__name__)


@dataclass
class EventOutcome:
    event_id: str
    outcome: str  # applied | duplicate | stale
    listing_id: int | None
    images_to_analyze: list[int] = field(default_factory=list)


def _insert(session: Session, table):  # noqa: ANN001, ANN202 - dialect-specific INSERT
    return (pg_insert if session.bind.dialect.name == "postgresql" else sqlite_insert)(table)


def _lock_listing(session: Session, listing_id: int) -> m.Listing:
    return session.execute(
        select(m.Listing).where(m.Listing.id == listing_id).with_for_update()
    ).scalar_one()


def apply_event(session: Session, event: ListingEvent) -> EventOutcome:
    """Apply one validated event. Call inside a transaction; the caller commits."""
    inserted = session.execute(
        _insert(session, m.ProcessedEvent.__table__)
        .values(
            event_id=event.event_id,
            type=event.type,
            listing_external_id=event.listing.id,
            occurred_at=event.occurred_at,
            received_at=m.utcnow(),
            outcome="applied",
        )
        .on_conflict_do_nothing(index_elements=["event_id"])
        .returning(m.ProcessedEvent.event_id)
    ).first()
    if inserted is None:
        return _redelivered(session, event)

    # Make sure the listing row exists, then lock it: concurrent events for one listing
    # apply one after the other.
    session.execute(
        _insert(session, m.Listing.__table__)
        .values(
            external_id=event.listing.id,
            seller_id=event.listing.seller_id,
            title=event.listing.title,
            category=event.listing.category,
            status="pending",
            created_at=m.utcnow(),
            updated_at=m.utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["external_id"])
    )
    listing = session.execute(
        select(m.Listing).where(m.Listing.external_id == event.listing.id).with_for_update()
    ).scalar_one()

    if listing.last_event_at is not None and _aware(listing.last_event_at) > event.occurred_at:
        session.execute(
            update(m.ProcessedEvent)
            .where(m.ProcessedEvent.event_id == event.event_id)
            .values(outcome="stale")
        )
        log.info("event %s is older than the last applied one for listing %s; ignored",
                 event.event_id, event.listing.id)
        return EventOutcome(event.event_id, "stale", listing.id)

    listing.last_event_id = event.event_id
    listing.last_event_at = event.occurred_at
    if event.type == "listing.deleted":
        listing.status = "deleted"
        return EventOutcome(event.event_id, "applied", listing.id)

    listing.seller_id = event.listing.seller_id
    listing.title = event.listing.title
    listing.category = event.listing.category
    to_analyze = _sync_images(session, listing, event.listing.images)
    if to_analyze:
        listing.status = "processing"
        listing.processed_at = None
    else:
        listing.status = "done"
        listing.processed_at = m.utcnow()
    session.flush()
    return EventOutcome(event.event_id, "applied", listing.id, to_analyze)


def _sync_images(session: Session, listing: m.Listing, refs: list[str]) -> list[int]:
    """Make the listing's image rows match ``refs``. New URLs get new rows; URLs that stayed
    are re-checked (the task skips the models when the bytes are unchanged); removed URLs
    lose their rows and results."""
    wanted: list[str] = list(dict.fromkeys(refs))  # de-duplicate, keep order
    existing = {img.url: img for img in listing.images}
    for url, img in existing.items():
        if url not in wanted:
            session.delete(img)
    ids = []
    for position, url in enumerate(wanted):
        img = existing.get(url)
        if img is None:
            img = m.Image(listing=listing, url=url, position=position, status="pending")
            session.add(img)
        else:
            img.position = position
            img.status = "pending"
            img.error = None
            img.attempts = 0
        session.flush()
        ids.append(img.id)
    return ids


def _redelivered(session: Session, event: ListingEvent) -> EventOutcome:
    """The event was applied before. Its images may not have been announced (the process
    died between commit and enqueue), so report the ones still pending."""
    listing = session.execute(
        select(m.Listing).where(m.Listing.external_id == event.listing.id)
    ).scalar_one_or_none()
    if listing is None:
        return EventOutcome(event.event_id, "duplicate", None)
    pending = session.execute(
        select(m.Image.id).where(m.Image.listing_id == listing.id, m.Image.status == "pending")
    ).scalars().all()
    return EventOutcome(event.event_id, "duplicate", listing.id, list(pending))


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
        _finish_image(session, image, status="failed",
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
            _clear_results(session, image_id)
            _finish_image(session, image, status="failed", error=f"{exc.code}: {exc}", settings=settings)
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
                _clear_results(session, image_id)
                _finish_image(session, image, status="failed", error=reason, settings=settings)
        return ImageOutcome(image_id, "failed", reason)


def _analyze_loaded(session: Session, image_id: int, url: str, listing_id: int, seller_id: str,
                    category: str | None, previously_done: bool, previous_sha: str | None,
                    loaded: LoadedImage, settings: Settings) -> ImageOutcome:
    with session.begin():
        if previously_done and previous_sha == loaded.sha256 and _same_pipeline(session, image_id, settings):
            image = session.get(m.Image, image_id)
            if image is not None and image.status == "pending":
                _finish_image(session, image, status="done", error=None, settings=settings)
            return ImageOutcome(image_id, "done", "unchanged bytes: previous results kept")

        ctx = ImageContext(
            image_id=image_id, listing_id=listing_id, seller_id=seller_id, category=category,
            url=url, image=loaded.image, raw=loaded.raw, source_format=loaded.format,
            sha256=loaded.sha256, settings=settings, db=session,
        )
        runs = run_steps(ctx, settings.steps)

        _lock_listing(session, listing_id)
        image = session.get(m.Image, image_id, populate_existing=True)
        if image is None or image.url != url or image.status != "pending":
            return ImageOutcome(image_id, "skipped", "changed while processing")
        _clear_results(session, image_id)
        _store_runs(session, image, loaded, runs, ctx)
        _finish_image(session, image, status="done", error=None, loaded=loaded, settings=settings)
    return ImageOutcome(image_id, "done", steps=runs)


def _same_pipeline(session: Session, image_id: int, settings: Settings) -> bool:
    """Did the stored results come from the steps and model versions configured now? If not,
    unchanged bytes are analysed again (a new model version re-tags old photos)."""
    stored = {(step, version) for step, version in session.execute(
        select(m.StepRunRecord.step, m.StepRunRecord.model_version)
        .where(m.StepRunRecord.image_id == image_id)
    )}
    wanted = {(name, _version_of(name)) for name in settings.steps}
    return stored == wanted


def _version_of(name: str) -> str:
    try:
        return get_step(name).version
    except Exception:  # noqa: BLE001 - a step that cannot even report a version
        return "unknown"


def _clear_results(session: Session, image_id: int) -> None:
    for model in (m.Tag, m.Detection, m.StepRunRecord, m.ArtifactRecord, m.Embedding):
        session.execute(delete(model).where(model.image_id == image_id))
    # Reviewed flags are history: only flags nobody has looked at are replaced.
    session.execute(delete(m.Flag).where(m.Flag.image_id == image_id, m.Flag.status == "open"))


def _store_runs(session: Session, image: m.Image, loaded: LoadedImage, runs: list[StepRun],
                ctx: ImageContext) -> None:
    reviewed = set(session.execute(
        select(m.Flag.kind).where(m.Flag.image_id == image.id, m.Flag.status != "open")
    ).scalars())
    for run in runs:
        result = run.result
        session.add(m.StepRunRecord(
            image_id=image.id, step=run.step, model_version=run.version, status=run.status,
            duration_ms=run.duration_ms, output=(result.data if result else {}), error=run.error,
        ))
        if result is None:
            continue
        for tag in result.tags:
            session.add(m.Tag(listing_id=image.listing_id, image_id=image.id, name=tag.name,
                              score=float(tag.score), source=tag.source, model_version=run.version))
        for det in result.detections:
            x0, y0, x1, y1 = (float(v) for v in det.box)
            session.add(m.Detection(image_id=image.id, label=det.label, score=float(det.score),
                                    x0=x0, y0=y0, x1=x1, y1=y1, model_version=run.version))
        for flag in result.flags:
            if flag.kind in reviewed:
                continue  # a reviewer already decided on this kind for this image
            session.add(m.Flag(listing_id=image.listing_id, image_id=image.id, kind=flag.kind,
                               score=float(flag.score), evidence=flag.evidence,
                               model_version=run.version))
        for art in result.artifacts:
            session.add(m.ArtifactRecord(image_id=image.id, kind=art.kind, path=str(art.path),
                                         width=art.width, height=art.height,
                                         model_version=run.version))
        if result.embedding is not None:
            vec = np.asarray(result.embedding, dtype="<f4").ravel()
            session.add(m.Embedding(image_id=image.id, model_version=run.version,
                                    dim=int(vec.size), vector=vec.tobytes()))
        persist = getattr(get_step(run.step), "persist", None)
        if persist is not None:
            session.flush()
            persist(session, image, result)
    meta = ctx.results.get("metadata")
    if meta is not None:
        image.phash = to_signed64(int(meta.data["phash"], 16))
        image.dhash = to_signed64(int(meta.data["dhash"], 16))


def _finish_image(session: Session, image: m.Image, *, status: str, error: str | None,
                  loaded: LoadedImage | None = None, settings: Settings | None = None) -> None:
    image.status = status
    image.error = error
    image.processed_at = m.utcnow()
    if loaded is not None:
        image.sha256 = loaded.sha256
        image.width, image.height = loaded.width, loaded.height
        image.format = loaded.format
        image.size_bytes = loaded.size_bytes
    session.flush()
    finish_listing_if_complete(session, image.listing_id, settings)


def finish_listing_if_complete(session: Session, listing_id: int, settings: Settings | None = None) -> bool:
    listing = _lock_listing(session, listing_id)
    if listing.status in ("done", "deleted"):
        return listing.status == "done"
    pending = session.execute(
        select(func.count()).select_from(m.Image)
        .where(m.Image.listing_id == listing_id, m.Image.status == "pending")
    ).scalar_one()
    if pending:
        return False
    listing.status = "done"
    listing.processed_at = m.utcnow()
    update_fraud_score(session, listing, settings)
    return True


def update_fraud_score(session: Session, listing: m.Listing, settings: Settings | None) -> None:
    """Combine the flags of all the listing's images into one score (worker/fraud/score.py)."""
    from worker.fraud.score import fraud_score_for_settings

    if settings is None:
        return
    session.flush()
    flags = session.execute(select(m.Flag).where(m.Flag.listing_id == listing.id)).scalars().all()
    result = fraud_score_for_settings(flags, settings)
    listing.fraud_score, listing.fraud_decision = result.score, result.decision


def stale_images(session: Session, older_than: timedelta, limit: int = 1000) -> list[int]:
    """Pending images nobody has touched for a while: their task was lost (e.g. an embedded
    broker message that died with its worker). Touching them prevents re-queueing twice."""
    cutoff = datetime.now(timezone.utc) - older_than
    rows = session.execute(
        select(m.Image).join(m.Listing)
        .where(m.Image.status == "pending", m.Image.updated_at < cutoff, m.Listing.status != "deleted")
        .order_by(m.Image.updated_at).limit(limit)
    ).scalars().all()
    for img in rows:
        img.updated_at = m.utcnow()
    return [img.id for img in rows]


def record_dead_letter(session: Session, source: str, payload: str, reason: str) -> None:
    session.add(m.DeadLetter(source=source, payload=payload[:100_000], reason=reason))


def _aware(value: datetime) -> datetime:
    # SQLite returns naive datetimes; everything we store is UTC.
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
