"""Fetch and analyse images (the inference queue): one per message, or several of one event."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from tasks.base import DatabaseTask
from tasks.outbound import relay_now
from worker.celery_app import ANALYZE_IMAGE_TASK, ANALYZE_IMAGES_TASK, app
from worker.config import Settings
from worker.pipeline.analyze import analyze_image as analyze
from worker.pipeline.analyze import analyze_images as analyze_several
from worker.pipeline.lease import Holder

log = logging.getLogger(__name__)


@app.task(bind=True, base=DatabaseTask, name=ANALYZE_IMAGE_TASK, max_retries=3)
def analyze_image(self: DatabaseTask, image_id: int, event_id: str | None = None) -> str:
    settings = self.settings
    fetch_retries = self.work_retries  # retries during a database outage do not count here
    # The message's id and retry count: a redelivery of this message may take its lease over.
    holder = Holder(str(self.request.id or f"eager-{image_id}"), self.request.retries)
    with self.open_session() as session:
        outcome = analyze(session, image_id, settings, max_attempts=settings.max_attempts,
                          retry_transient=fetch_retries < settings.fetch_retries, holder=holder,
                          event_id=event_id)  # one log line per run, with the listing's external id
    if outcome.status == "retry":
        countdown = settings.fetch_retry_delay * (2 ** fetch_retries)
        log.info("image %s: %s; retrying in %ss", image_id, outcome.detail, countdown)
        # The fetch budget was checked above (retry_transient), so Celery's count must not stop it.
        raise self.retry(countdown=countdown, max_retries=self.request.retries + 1)
    if outcome.decision is not None:  # this run finished the listing: announce it now, not at
        relay_now(settings)           # the next sweep (other runs recorded no event to relay)
    return outcome.status


@app.task(bind=True, base=DatabaseTask, name=ANALYZE_IMAGES_TASK, max_retries=3)
def analyze_images(self: DatabaseTask, image_ids: list[int], event_id: str | None = None) -> dict[str, int]:
    """Several images in one message (``worker.pipeline.analyze.analyze_images``: one claim and
    one store transaction for all). The delivery guarantees are those of :func:`analyze_image`
    per image: acknowledged after the run, redelivered if the worker dies (each image's lease
    then lets the redelivery take it over), a database error runs the whole message again. An
    image whose host asked for a retry goes on alone, as the single-image task's first retry."""
    settings = self.settings
    holder = Holder(str(self.request.id or f"eager-{min(image_ids, default=0)}"), self.request.retries)
    with self.open_session() as session:
        outcomes = analyze_several(session, list(image_ids), settings, max_attempts=settings.max_attempts,
                                   retry_transient=self.work_retries < settings.fetch_retries, holder=holder,
                                   event_id=event_id)
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
        if outcome.status == "retry":
            countdown = settings.fetch_retry_delay
            log.info("image %s: %s; retrying in %ss", outcome.image_id, outcome.detail, countdown)
            # retries=1 (a send_task option): what analyze_image's own first retry would carry,
            # so the image keeps the same fetch budget.
            first_retry: dict[str, Any] = {"retries": 1}
            analyze_image.apply_async((outcome.image_id,), {"event_id": event_id}, countdown=countdown,
                                      **first_retry)
    if any(outcome.decision is not None for outcome in outcomes):
        relay_now(settings)
    return counts


def announce_images(image_ids: Sequence[int], settings: Settings, event_id: str | None = None) -> None:
    """Send the analysis of ``image_ids`` (after the commit that made them pending): groups of
    up to CATALOG_IMAGES_PER_TASK in one message each, a lone image as ``analyze_image``."""
    ids = list(image_ids)
    size = max(1, settings.images_per_task)
    for start in range(0, len(ids), size):
        group = ids[start:start + size]
        if len(group) == 1:
            analyze_image.delay(group[0], event_id=event_id)
        else:
            analyze_images.delay(group, event_id=event_id)
