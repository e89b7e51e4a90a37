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
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import models as m
from worker.config import CUDA_BATCH_DEFAULT, Settings
from worker.io.errors import ImageLoadError
from worker.io.load import LoadedImage, load_image
from worker.observe import metrics, report
from worker.pipeline.contract import ImageContext, StepRun
from worker.pipeline.lease import Heartbeat, Holder, check_lease, db_now, engine_of, release
from worker.pipeline.registry import get_step, run_steps, safe_version
from worker.pipeline.store import (
    LISTING_DELETED,
    Rows,
    clear_results,
    finish_image,
    finish_listing_if_complete,
    has_stored_results,
    insert_rows,
    is_retryable_db_error,
    lock_image,
    lock_images,
    lock_listing,
    store_runs,
)
from worker.pipeline.writers import WriteContext, apply_writers, get_writer
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
        return _claim_locked(session, listing, image, image_id, None, holder.new_token(), holder,
                             settings, max_attempts)


def _claim_locked(session: Session, listing: m.Listing, image: m.Image | None, image_id: int,
                  now: datetime | None, token: str, holder: Holder, settings: Settings,
                  max_attempts: int) -> Claim | ImageOutcome:
    """The claim of one image whose listing and row this transaction has locked (``now``: the
    lease clock, read here when None)."""
    if image is None or image.status != "pending":
        return ImageOutcome(image_id, "skipped", "not pending", listing=listing.external_id)
    if listing.status == "deleted":  # a row left pending by an older release
        finish_image(session, image, status="failed", error=LISTING_DELETED, settings=settings)
        return ImageOutcome(image_id, "skipped", "listing deleted", listing=listing.external_id)
    now = now or db_now(session)
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
    return _write(session, claim, computed, settings)


def _write(session: Session, claim: Claim, computed: _Computed, settings: Settings) -> ImageOutcome:
    """Phase 3 for one image in its own transaction(s): store, fail, keep or hand to a retry."""
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
    problem = _not_held(claim, listing, image)
    if problem is not None or image is None:
        return problem or "changed while processing"
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
        complete, detail = _completeness(runs, settings)
        finish_image(session, image, status="done", error=None, loaded=loaded, settings=settings,
                     complete=complete, listing=listing)
        decision = _decision(listing)
    return ImageOutcome(claim.image_id, "done", detail, steps=runs, decision=decision)


def _completeness(runs: list[StepRun], settings: Settings) -> tuple[bool, str]:
    """Whether every configured step ran ok, and the outcome's detail saying which did not."""
    complete = all(run.status == "ok" for run in runs) and {run.step for run in runs} >= set(settings.steps)
    detail = "" if complete else "incomplete: " + ", ".join(
        f"{run.step} {run.status}" for run in runs if run.status != "ok")
    return complete, detail


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


# --------------------------------------------------------------------------- several images


def analyze_images(session: Session, image_ids: list[int], settings: Settings, *, max_attempts: int = 3,
                   retry_transient: bool = False, holder: Holder | None = None,
                   event_id: str | None = None) -> list[ImageOutcome]:
    """Several images (normally one listing's, as one event announced them) in one run: **one**
    claim transaction for all of them, then each is fetched and analysed, then **one** store
    transaction stores them all and finishes their listing once. Per image everything is as in
    :func:`analyze_image`: the same lease (one token for the batch, renewed by one heartbeat),
    the same checks under the row locks, the same outcomes, in the order of ``image_ids``.

    * An image whose fetch is to be retried gets its lease back in the store transaction and an
      outcome ``retry``: the caller sends it again as a single-image task.
    * A database error anywhere propagates (the caller runs the whole batch again; each image
      is idempotent); after the claim the leases are given back where the database allows.
    * Anything else going wrong in the shared store transaction rolls it back and each image is
      then written alone, as :func:`analyze_image` does (a bug fails one image, not the batch).
    """
    elapsed = metrics.timer()
    with metrics.image_in_flight():
        outcomes = _analyze_batch(session, list(dict.fromkeys(image_ids)), settings, max_attempts,
                                  retry_transient, holder or Holder.one_off())
    seconds = elapsed() / max(1, len(outcomes))
    for outcome in outcomes:
        report.image_finished(image_id=outcome.image_id, listing=outcome.listing, event_id=event_id,
                              status=outcome.status, detail=outcome.detail, decision=outcome.decision,
                              seconds=seconds)
    return outcomes


def claim_images(session: Session, image_ids: list[int], settings: Settings, holder: Holder,
                 max_attempts: int) -> list[Claim | ImageOutcome]:
    """Phase 1 for several images in one transaction: each listing locked (in id order), then
    its images (in id order), one lease token for all of them. Per image the result of
    :func:`claim_image`, in the order of ``image_ids``."""
    with session.begin():
        listing_of: dict[int, int] = {row.id: row.listing_id for row in session.execute(
            select(m.Image.id, m.Image.listing_id).where(m.Image.id.in_(image_ids)))}
        out: dict[int, Claim | ImageOutcome] = {
            i: ImageOutcome(i, "skipped", "no such image (removed from its listing)")
            for i in image_ids if i not in listing_of}
        token = holder.new_token()
        now: datetime | None = None
        for listing_id in sorted(set(listing_of.values())):
            listing = lock_listing(session, listing_id)  # listing first, then its images
            ids = sorted(i for i, owner in listing_of.items() if owner == listing_id)
            images = {image.id: image for image in lock_images(session, listing_id, ids)}
            for image_id in ids:
                image = images.get(image_id)
                if now is None and image is not None and image.status == "pending" and listing.status != "deleted":
                    now = db_now(session)
                out[image_id] = _claim_locked(session, listing, image, image_id, now, token, holder,
                                              settings, max_attempts)
        return [out[i] for i in image_ids]


def _analyze_batch(session: Session, image_ids: list[int], settings: Settings, max_attempts: int,
                   retry_transient: bool, holder: Holder) -> list[ImageOutcome]:
    claimed = claim_images(session, image_ids, settings, holder, max_attempts)
    claims = [c for c in claimed if isinstance(c, Claim)]
    done: dict[int, ImageOutcome] = {c.image_id: c for c in claimed if isinstance(c, ImageOutcome)}
    if claims:
        try:
            with Heartbeat(engine_of(session), [c.image_id for c in claims], claims[0].token,
                           settings.lease_seconds):
                work = _compute_all(claims, settings, retry_transient)
            for outcome in _write_batch(session, work, settings):
                done[outcome.image_id] = outcome
        except Exception as exc:
            if not is_retryable_db_error(exc):
                raise
            log.warning("images %s: database error (%s: %s); their analysis will be retried",
                        [c.image_id for c in claims], type(exc).__name__, (str(exc).splitlines() or [""])[0])
            _release_batch_quietly(session, claims)
            raise
    return [done[i] for i in image_ids]


def _compute_all(claims: list[Claim], settings: Settings, retry_transient: bool) -> list[tuple[Claim, _Computed]]:
    """Phase 2 for a message's images, in the claims' order: one at a time, or as many at
    once as the model runtime batches (``_concurrency``), so that one message of a listing's
    images fills the dynamic batcher as that many single-image tasks would."""
    workers = _concurrency(settings, len(claims))
    if workers <= 1:
        return [(claim, _compute(claim, settings, retry_transient)) for claim in claims]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="analyze") as pool:
        results = list(pool.map(lambda claim: _compute(claim, settings, retry_transient), claims))
    return list(zip(claims, results, strict=True))


def _concurrency(settings: Settings, images: int) -> int:
    """Images of one message computed at once: the dynamic batch size where the runtime
    batches forwards (``CATALOG_BATCH_MAX_SIZE``; by default 8 on CUDA, 1 on CPU, where one
    image at a time measured faster). Without a model step in this process (torch never
    imported) nothing batches, and the device is not probed: a metadata-only worker must not
    import torch."""
    if images <= 1:
        return 1
    if settings.batch_max_size is not None:
        return max(1, min(images, settings.batch_max_size))
    torch = sys.modules.get("torch")
    if settings.device == "cpu" or torch is None:
        return 1
    on_cuda = settings.device == "cuda" or bool(torch.cuda.is_available())
    return max(1, min(images, CUDA_BATCH_DEFAULT if on_cuda else 1))


def _write_batch(session: Session, work: list[tuple[Claim, _Computed]], settings: Settings) -> list[ImageOutcome]:
    """Phase 3 for several images in one transaction; on anything but a database error, each
    image alone (:func:`_write`)."""
    try:
        outcomes = _store_batch(session, work, settings)
    except Exception as exc:
        if is_retryable_db_error(exc):
            raise
        log.exception("images %s: error while storing them together; storing each alone",
                      [claim.image_id for claim, _ in work])
        outcomes = [_write(session, claim, computed, settings) for claim, computed in work]
    for (claim, _), outcome in zip(work, outcomes, strict=True):
        outcome.listing = claim.listing_external_id
    return outcomes


def _store_batch(session: Session, work: list[tuple[Claim, _Computed]], settings: Settings) -> list[ImageOutcome]:
    with session.begin():
        listings: dict[int, m.Listing] = {}
        images: dict[int, m.Image] = {}
        for listing_id in sorted({claim.listing_id for claim, _ in work}):
            listings[listing_id] = lock_listing(session, listing_id)
            ids = [claim.image_id for claim, _ in work if claim.listing_id == listing_id]
            images.update((image.id, image) for image in lock_images(session, listing_id, ids))
        outcomes: list[ImageOutcome] = []
        finished: dict[int, ImageOutcome] = {}  # listing id -> the last image finished in it
        rows: Rows = {}  # the generic result rows of every image: one INSERT per table
        for claim, computed in work:
            outcome = _store_locked(session, claim, computed, listings[claim.listing_id],
                                    images.get(claim.image_id), settings, rows)
            outcomes.append(outcome)
            if outcome.status in ("done", "failed"):
                finished[claim.listing_id] = outcome
        insert_rows(session, rows)
        session.flush()  # every image row at once
        for listing_id, last in finished.items():
            listing = listings[listing_id]
            finish_listing_if_complete(session, listing_id, settings, listing=listing)
            last.decision = _decision(listing)
    return outcomes


def _store_locked(session: Session, claim: Claim, computed: _Computed, listing: m.Listing,
                  image: m.Image | None, settings: Settings, rows: Rows) -> ImageOutcome:
    """One image of a batch store (its listing and row locked): what :func:`_write` does for
    it, without finishing the listing (the caller does, once) and with its generic rows
    collected in ``rows`` (the caller inserts them)."""
    if computed.retry is not None:
        release(session, claim.image_id, claim.token)
        return ImageOutcome(claim.image_id, "retry", computed.retry)
    problem = _not_held(claim, listing, image)
    if problem is not None or image is None:
        detail = "changed while processing" if computed.failure is not None or computed.loaded is None else problem
        return ImageOutcome(claim.image_id, "skipped", detail or "changed while processing")
    if computed.failure is not None or computed.loaded is None:
        reason = computed.failure or "internal_error: nothing was loaded"
        if has_stored_results(image):
            clear_results(session, claim.image_id)
        finish_image(session, image, status="failed", error=reason, settings=settings, listing=listing,
                     finish_listing=False)
        return ImageOutcome(claim.image_id, "failed", reason)
    if computed.runs is None:
        finish_image(session, image, status="done", error=None, settings=settings, complete=True,
                     listing=listing, finish_listing=False)
        return ImageOutcome(claim.image_id, "done", "unchanged bytes: previous results kept")
    runs = computed.runs
    if has_stored_results(image):
        clear_results(session, claim.image_id)
    if any(get_writer(run.step) is not None for run in runs):
        # A writer may read what the images before it stored (the duplicate search reads their
        # embeddings): their rows go in first, as they would with one transaction per image.
        insert_rows(session, rows)
        rows.clear()
    wctx = WriteContext(session=session, image_id=image.id, listing_id=listing.id,
                        seller_id=listing.seller_id, settings=settings)
    runs = apply_writers(wctx, runs)
    with session.no_autoflush:
        store_runs(session, image, runs, rows)
        store_image_vectors(session, settings, image_id=image.id, listing_id=listing.id, runs=runs)
    complete, detail = _completeness(runs, settings)
    finish_image(session, image, status="done", error=None, loaded=computed.loaded, settings=settings,
                 complete=complete, listing=listing, finish_listing=False)
    return ImageOutcome(claim.image_id, "done", detail, steps=runs)


def _not_held(claim: Claim, listing: m.Listing, image: m.Image | None) -> str | None:
    """:func:`_held_image`'s checks on rows already locked: None when the run still holds it."""
    if image is None or image.url != claim.url or image.status != "pending" or listing.status == "deleted":
        return "changed while processing"
    if image.lease_owner != claim.token:
        log.warning("image %s: another run took its lease over while this one worked (it was "
                    "declared dead); this run's results are dropped", claim.image_id)
        return "lease taken over by another run"
    return None


def _release_batch_quietly(session: Session, claims: list[Claim]) -> None:
    """After a database error: give every lease of the batch up if the database lets us (see
    :func:`_release_quietly`)."""
    try:
        session.rollback()
        with session.begin():
            for listing_id in sorted({c.listing_id for c in claims}):
                lock_listing(session, listing_id)
            for claim in claims:
                release(session, claim.image_id, claim.token)
    except Exception as exc:  # noqa: BLE001 - the database is the problem; the retry handles it
        log.info("images %s: leases not released (%s); the retry takes them over",
                 [c.image_id for c in claims], type(exc).__name__)
