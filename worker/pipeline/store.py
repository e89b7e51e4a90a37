"""Store an image's results and finish images and listings (inside the caller's transaction).

* an image's results are replaced as a whole inside one transaction (old rows deleted, new rows
  inserted in bulk: one INSERT per table, not one per row), so re-running an image never
  duplicates rows;
* "is the listing finished?" is decided while holding the listing row lock, so two images that
  finish at the same moment cannot both miss (or both take) the transition;
* **one lock order everywhere**: a transaction that locks or writes image rows first locks
  their listing row (``lock_listing``: ``SELECT ... FOR UPDATE``), then the images, then flags.
  Applying an event, claiming, storing, failing, giving up, the sweeps and a reviewer's verdict
  all follow it, so two of them can wait for each other but never deadlock. The one exception is
  the lease heartbeat (``worker.pipeline.lease.renew``): a single-row statement that holds no
  other lock and so cannot close a cycle;
* an image is finished as ``done`` (with ``complete`` saying whether every step ran ok) or
  ``failed`` (``complete`` false); finishing clears its lease;
* a listing's ``fraud_decision`` is ``incomplete`` instead of ``ok`` while any of its images is
  not fully analysed: an unanalysed photo is never vouched for.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from db import models as m
from worker.config import Settings
from worker.fraud.champion import champion_fraud_score
from worker.fraud.score import FraudScore
from worker.io.hashing import to_signed64
from worker.io.load import LoadedImage
from worker.outbound.outbox import listing_flags, listing_images, record_listing_event
from worker.pipeline.contract import StepRun

log = logging.getLogger(__name__)

# Tables holding one image's results, replaced as a whole when the image is analysed again.
RESULT_TABLES = (m.Tag, m.Detection, m.StepRunRecord, m.ArtifactRecord, m.Embedding, m.SearchVector)

#: ``images.error`` of an image whose listing was deleted before it was analysed.
LISTING_DELETED = "listing_deleted: the listing was deleted before this image was analysed"

#: Database errors after which the unit of work is run again (the task retries): the database
#: is unreachable or restarting, the connection dropped, a deadlock or lock timeout rolled the
#: transaction back, or two workers raced to insert one row. Never a reason to fail an image or
#: to call a step broken.
RETRYABLE_DB_ERRORS: tuple[type[Exception], ...] = (OperationalError, InterfaceError, IntegrityError)


def is_retryable_db_error(exc: BaseException) -> bool:
    return isinstance(exc, RETRYABLE_DB_ERRORS) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)


def lock_listing(session: Session, listing_id: int) -> m.Listing:
    """Lock the listing row: the first lock of every transaction that touches its images."""
    return session.execute(
        select(m.Listing).where(m.Listing.id == listing_id).with_for_update()
    ).scalar_one()


def lock_image(session: Session, image_id: int) -> m.Image | None:
    """Lock an image row (after its listing's) and read it afresh."""
    return session.execute(
        select(m.Image).where(m.Image.id == image_id).with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()


def lock_images(session: Session, listing_id: int, image_ids: list[int]) -> list[m.Image]:
    """Lock several images of one listing (after the listing's row), in id order, read afresh."""
    return list(session.execute(
        select(m.Image).where(m.Image.id.in_(sorted(image_ids)), m.Image.listing_id == listing_id)
        .order_by(m.Image.id).with_for_update().execution_options(populate_existing=True)
    ).scalars())


def end_pending_images(session: Session, listing_id: int, error: str) -> int:
    """Fail every pending image of a listing with ``error`` (the listing is locked); their
    queued messages then find nothing to do and running analyses drop their results."""
    ended = session.execute(
        select(m.Image.id).where(m.Image.listing_id == listing_id, m.Image.status == "pending")
    ).scalars().all()
    if ended:
        session.execute(
            update(m.Image).where(m.Image.id.in_(ended))
            .values(status="failed", error=error, complete=False, processed_at=m.utcnow(),
                    lease_owner=None, lease_expires_at=None)
        )
    return len(ended)


def clear_results(session: Session, image_id: int) -> None:
    """Delete the image's stored results (callers skip it for an image that was never
    finished: see :func:`has_stored_results`)."""
    for model in RESULT_TABLES:
        session.execute(delete(model).where(model.image_id == image_id))
    # Reviewed flags are history: only flags nobody has looked at are replaced.
    session.execute(delete(m.Flag).where(m.Flag.image_id == image_id, m.Flag.status == "open"))


def has_stored_results(image: m.Image) -> bool:
    """Whether the image (locked and read afresh) can have result rows. Results are only ever
    written by the transaction that finishes the image (``finish_image`` sets ``processed_at``,
    which nothing resets), so an image never finished has none: a first analysis skips
    :func:`clear_results`' DELETEs and the look-up of reviewed flags. A redelivered message
    whose earlier run stored results sees ``processed_at`` set and clears them."""
    return image.processed_at is not None


Rows = dict[type[m.Base], list[dict[str, Any]]]


def store_runs(session: Session, image: m.Image, runs: list[StepRun], rows: Rows | None = None) -> None:
    """Insert the generic rows of every step run (call after :func:`clear_results`).

    ``image.phash``/``dhash`` are set on the object, not flushed: run this under
    ``session.no_autoflush`` and let :func:`finish_image` write the image row once.
    ``rows``: collect the rows there instead of inserting them (several images stored in one
    transaction: :func:`insert_rows` then writes each table once for all of them)."""
    reviewed = set(session.execute(
        select(m.Flag.kind).where(m.Flag.image_id == image.id, m.Flag.status != "open")
    ).scalars()) if has_stored_results(image) else set()
    collect = rows is not None
    if rows is None:
        rows = {}
    for model in (*RESULT_TABLES, m.Flag):
        rows.setdefault(model, [])
    for run in runs:
        result = run.result
        rows[m.StepRunRecord].append({
            "image_id": image.id, "step": run.step, "model_version": run.version, "status": run.status,
            "duration_ms": run.duration_ms, "output": (result.data if result else {}), "error": run.error,
        })
        if result is None:
            continue
        version = run.version
        rows[m.Tag] += [{"listing_id": image.listing_id, "image_id": image.id, "name": tag.name,
                         "score": float(tag.score), "source": tag.source, "model_version": version}
                        for tag in result.tags]
        rows[m.Detection] += [{"image_id": image.id, "label": det.label, "score": float(det.score),
                               "x0": float(det.box[0]), "y0": float(det.box[1]),
                               "x1": float(det.box[2]), "y1": float(det.box[3]), "model_version": version}
                              for det in result.detections]
        # A reviewer already decided on a kind for this image: the verdict stands.
        rows[m.Flag] += [{"listing_id": image.listing_id, "image_id": image.id, "kind": flag.kind,
                          "score": float(flag.score), "evidence": flag.evidence, "model_version": version}
                         for flag in result.flags if flag.kind not in reviewed]
        rows[m.ArtifactRecord] += [{"image_id": image.id, "kind": art.kind, "path": str(art.path),
                                    "width": art.width, "height": art.height, "model_version": version}
                                   for art in result.artifacts]
        if result.embedding is not None:
            vec = np.asarray(result.embedding, dtype="<f4").ravel()
            rows[m.Embedding].append({"image_id": image.id, "model_version": version,
                                      "dim": int(vec.size), "vector": vec.tobytes()})
        if run.step == "metadata":
            image.phash = to_signed64(int(result.data["phash"], 16))
            image.dhash = to_signed64(int(result.data["dhash"], 16))
    if not collect:
        insert_rows(session, rows)


def insert_rows(session: Session, rows: Rows) -> None:
    """One bulk INSERT per table that has rows (in the order :func:`store_runs` fills them)."""
    for model, values in rows.items():
        if values:
            session.execute(insert(model), values)


def finish_image(session: Session, image: m.Image, *, status: str, error: str | None,
                 settings: Settings, loaded: LoadedImage | None = None, complete: bool = False,
                 listing: m.Listing | None = None, finish_listing: bool = True) -> None:
    """Finish the image (``done`` or ``failed``), release its lease and finish the listing if
    this was its last pending image. ``complete``: every configured step ran ok. ``listing``:
    the image's listing, when this transaction already locked it (saves locking it again).
    ``finish_listing=False``: the caller finishes several images of the listing in this
    transaction and calls :func:`finish_listing_if_complete` once after the last one (the
    image row is then written by that flush, together with the others)."""
    image.status = status
    image.error = error
    image.complete = complete and status == "done"
    image.lease_owner = None
    image.lease_expires_at = None
    image.processed_at = m.utcnow()
    if loaded is not None:
        image.sha256 = loaded.sha256
        image.width, image.height = loaded.width, loaded.height
        image.format = loaded.format
        image.size_bytes = loaded.size_bytes
    if finish_listing:
        session.flush()
        finish_listing_if_complete(session, image.listing_id, settings, listing=listing)


def finish_listing_if_complete(session: Session, listing_id: int, settings: Settings,
                               listing: m.Listing | None = None) -> bool:
    """``listing``: the row, when this transaction already locked it (else it is locked here).

    The listing's images and flags are read once each (plain rows) and serve the pending check,
    the fraud score, the decision and the ``listing.processed`` payload; the listing row is
    written by one UPDATE (status, time, score and decision together)."""
    if listing is None or listing.id != listing_id:
        listing = lock_listing(session, listing_id)
    if listing.status in ("done", "deleted"):
        return listing.status == "done"
    session.flush()  # the images as this transaction left them
    images = listing_images(session, listing_id)
    if any(image.status == "pending" for image in images):
        return False
    flags = listing_flags(session, listing_id)  # before the listing changes: no flush of it here
    listing.status = "done"
    listing.processed_at = m.utcnow()
    update_fraud_score(session, listing, settings, images=images, flags=flags)
    # listing.processed, in this transaction: it commits with the final state or not at all.
    record_listing_event(session, listing, settings, "processed", images=images, flags=flags)
    return True


def listing_fraud_score(session: Session, listing_id: int, settings: Settings,
                        flags: list[Any] | None = None) -> FraudScore:
    """Read the flags of all the listing's images and combine them (the pure rules are in
    worker/fraud/score.py) with the fraud-scorer champion's learnt weights when one is promoted,
    else CATALOG_FRAUD_WEIGHTS (worker/fraud/champion.py). The listings table has no column
    for the weights' version, so it is logged with the score. ``flags``: rows of
    :func:`worker.outbound.outbox.listing_flags` read by the caller in this transaction."""
    if flags is None:
        session.flush()
        flags = listing_flags(session, listing_id)
    result, version = champion_fraud_score(flags, settings)
    log.info("listing %s: fraud score %.4f (%s) with %s", listing_id, result.score, result.decision, version)
    return result


def update_fraud_score(session: Session, listing: m.Listing, settings: Settings, *,
                       images: list[Any] | None = None, flags: list[Any] | None = None) -> None:
    """Store the listing's current fraud score and decision (the listing is locked).

    The score combines the flags found. The decision is the score's (``ok``/``review``/``hold``),
    except that ``ok`` becomes ``incomplete`` while some image is not fully analysed (failed,
    pending, or done with a step that failed, was unavailable or was skipped): what nobody
    looked at is never vouched for. A ``review`` or ``hold`` stands either way.
    ``images``/``flags``: rows of :func:`worker.outbound.outbox.listing_images`/``listing_flags``
    the caller read in this transaction after its last change to them (read here when not given)."""
    result = listing_fraud_score(session, listing.id, settings, flags=flags)
    decision = result.decision
    if decision == "ok":
        unanalysed = (sum(1 for image in images if not fully_analysed(image.status, image.complete))
                      if images is not None else unanalysed_images(session, listing.id))
        if unanalysed:
            decision = "incomplete"
    listing.fraud_score, listing.fraud_decision = result.score, decision


def fully_analysed(status: str, complete: bool | None) -> bool:
    """The rule of :func:`unanalysed_images` for one image's values."""
    return status == "done" and (complete is None or complete is True)


def unanalysed_images(session: Session, listing_id: int) -> int:
    """Images of the listing not fully analysed. ``complete`` NULL on a done image (stored by a
    release before the column existed) counts as analysed: nothing says otherwise."""
    fully = (m.Image.status == "done") & or_(m.Image.complete.is_(None), m.Image.complete.is_(True))
    return int(session.execute(
        select(func.count()).select_from(m.Image).where(m.Image.listing_id == listing_id, ~fully)
    ).scalar_one())
