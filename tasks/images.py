"""Fetch and analyse one image (the inference queue)."""

from __future__ import annotations

import logging

from tasks.base import DatabaseTask
from tasks.outbound import relay_now
from worker.celery_app import ANALYZE_IMAGE_TASK, app
from worker.pipeline.analyze import analyze_image as analyze
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
