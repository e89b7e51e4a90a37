"""Backfill: bring images analysed with an older version of a model up to the current one.

``catalog backfill --model NAME`` (and the ``tasks.training.backfill`` task the retrain
enqueues after a promotion with CATALOG_BACKFILL_AFTER_PROMOTE) selects the images whose
``step_runs`` row for the model's step records another version than the step's current one
(``category-head`` and ``attribute-head-*`` belong to the tagging step; a step name works too),
oldest image id first, and analyses each again **through the normal pipeline path**
(``analyze_image``: fetch, run the configured steps, replace the image's results in one
transaction). Re-running the one step alone is not done: the steps' results are stored and
replaced per image as a whole (tags, embeddings, flags of every step in one transaction), so a
partial write would need a second store path. The cost is that the other steps run again too;
their versions are unchanged, so only the tagging results actually change.

For ``fraud-scorer`` nothing is analysed: the finished listings' fraud scores are recomputed
with the current weights.

Throttled (``rate`` items per second), bounded (``limit`` per run), and resumable: a cursor
file ``<data_dir>/backfill/<model>.json`` keeps the last id done and the version it was
backfilling to; the next run continues after it (a newer version starts over from the first id).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import select

from db import models as m
from db.session import session_factory, transaction
from worker.config import Settings
from worker.fraud.champion import fraud_weights
from worker.outbound.outbox import record_listing_event
from worker.pipeline.registry import STEP_REGISTRY, get_step, safe_version
from worker.pipeline.store import lock_image, lock_listing, update_fraud_score
from worker.steps.tagging import ATTRIBUTE_PREFIX

log = logging.getLogger(__name__)

FRAUD_SCORER = "fraud-scorer"
BATCH = 200


class BackfillError(Exception):
    """The backfill cannot run as asked; the message says why."""


@dataclass
class BackfillReport:
    model: str
    step: str | None  # None: listings re-scored (fraud-scorer)
    target: str  # the version brought in
    done: int = 0
    failed: int = 0
    skipped: int = 0
    cursor: int = 0  # the last id handled
    remaining: bool = False  # stopped by the limit with more to do
    failures: list[str] = field(default_factory=list)


def step_of(model: str) -> str | None:
    """The analysis step a model belongs to (None: the fraud scorer, which has no step)."""
    if model == FRAUD_SCORER:
        return None
    if model == "category-head" or model.startswith(ATTRIBUTE_PREFIX):
        return "tagging"
    if model in STEP_REGISTRY:
        return model
    raise BackfillError(f"unknown model {model!r}: use category-head, attribute-head-<name>, fraud-scorer "
                        f"or a step name ({', '.join(sorted(STEP_REGISTRY))})")


def cursor_path(settings: Settings, model: str) -> Path:
    return settings.data_dir / "backfill" / f"{model}.json"


def _read_cursor(path: Path, target: str) -> int:
    try:
        blob = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0
    return int(blob.get("after", 0)) if blob.get("target") == target else 0


def _write_cursor(path: Path, model: str, target: str, after: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model": model, "target": target, "after": after}))
    tmp.replace(path)


def _pending_images(url: str, step: str, target: str, after: int, since: datetime | None) -> list[int]:
    query = (select(m.StepRunRecord.image_id).join(m.Image, m.Image.id == m.StepRunRecord.image_id)
             .where(m.StepRunRecord.step == step, m.StepRunRecord.model_version != target,
                    m.Image.status == "done", m.StepRunRecord.image_id > after)
             .distinct().order_by(m.StepRunRecord.image_id).limit(BATCH))
    if since is not None:
        query = query.where(m.Image.processed_at >= since)
    with transaction(url) as session:
        return list(session.scalars(query))


def _pending_listings(url: str, after: int, since: datetime | None) -> list[int]:
    query = (select(m.Listing.id).where(m.Listing.status == "done", m.Listing.id > after)
             .order_by(m.Listing.id).limit(BATCH))
    if since is not None:
        query = query.where(m.Listing.processed_at >= since)
    with transaction(url) as session:
        return list(session.scalars(query))


def reanalyse(settings: Settings, image_id: int) -> str:
    """Analyse one finished image again through the normal path; its listing (still ``done``)
    gets its fraud score recomputed from the new flags. Returns the outcome's status."""
    from worker.pipeline.analyze import analyze_image

    url = settings.effective_database_url
    with transaction(url) as session:
        listing_id = session.scalar(select(m.Image.listing_id).where(m.Image.id == image_id))
        if listing_id is None:
            return "skipped"
        lock_listing(session, listing_id)  # the lock order of every writer: listing, then image
        image = lock_image(session, image_id)
        if image is None or image.status != "done":
            return "skipped"  # changed meanwhile (an event re-queued it, or it failed)
        image.status = "pending"
    with session_factory(url)() as session:
        outcome = analyze_image(session, image_id, settings)
    rescore(settings, listing_id)
    return outcome.status


def rescore(settings: Settings, listing_id: int) -> None:
    with transaction(settings.effective_database_url) as session:
        listing = lock_listing(session, listing_id)
        if listing.status == "done":
            before = (listing.fraud_score, listing.fraud_decision)
            update_fraud_score(session, listing, settings)
            if (listing.fraud_score, listing.fraud_decision) != before:  # listing.processed, rescored
                record_listing_event(session, listing, settings, "rescored")


def _ids(fetch: Callable[[int], list[int]], after: int) -> Iterator[int]:
    while True:
        batch = fetch(after)
        if not batch:
            return
        yield from batch
        after = batch[-1]


def backfill(settings: Settings, model: str, *, since: datetime | None = None, limit: int | None = None,
             rate: float | None = None, progress: bool = False,
             sleep: Callable[[float], None] = time.sleep) -> BackfillReport:
    """Run (or continue) the backfill of ``model``; see the module doc."""
    from tqdm import tqdm

    step = step_of(model)
    url = settings.effective_database_url
    if step is not None and step not in settings.steps:
        raise BackfillError(f"step {step!r} is not in CATALOG_STEPS: nothing would re-run it")
    target = fraud_weights(settings).version if step is None else safe_version(get_step(step), settings)
    path = cursor_path(settings, model)
    after = _read_cursor(path, target)
    report = BackfillReport(model, step, target, cursor=after)

    def fetch(cursor: int) -> list[int]:
        if step is None:
            return _pending_listings(url, cursor, since)
        return _pending_images(url, step, target, cursor, since)

    interval = 1.0 / rate if rate else 0.0
    bar = tqdm(desc=f"backfill {model}", unit="listing" if step is None else "image", disable=not progress,
               total=limit)
    started = time.monotonic()
    try:
        for count, item in enumerate(_ids(fetch, after)):
            if limit is not None and count >= limit:
                report.remaining = True
                break
            if interval:  # throttle: item n starts no earlier than n / rate seconds after the first
                wait = started + count * interval - time.monotonic()
                if wait > 0:
                    sleep(wait)
            status = "done" if step is None else reanalyse(settings, item)
            if step is None:
                rescore(settings, item)
            if status == "done":
                report.done += 1
            elif status == "failed":
                report.failed += 1
                report.failures.append(str(item))
            else:
                report.skipped += 1
            report.cursor = item
            _write_cursor(path, model, target, item)
            bar.update(1)
    finally:
        bar.close()
    log.info("backfill %s to %s: %d done, %d failed, %d skipped, cursor %d%s", model, target, report.done,
             report.failed, report.skipped, report.cursor, " (more left)" if report.remaining else "")
    return report
