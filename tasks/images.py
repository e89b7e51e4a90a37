"""Fetch and analyse one image (the inference queue)."""

from __future__ import annotations

import logging

from tasks.base import DatabaseTask
from worker.celery_app import app
from worker.pipeline.analyze import analyze_image as analyze

log = logging.getLogger(__name__)


@app.task(bind=True, base=DatabaseTask, name="tasks.images.analyze_image", max_retries=3)
def analyze_image(self: DatabaseTask, image_id: int) -> str:
    settings = self.settings
    with self.open_session() as session:
        outcome = analyze(
            session, image_id, settings,
            max_attempts=settings.max_attempts,
            retry_transient=self.request.retries < settings.fetch_retries,
        )
    if outcome.status == "retry":
        countdown = settings.fetch_retry_delay * (2 ** self.request.retries)
        log.info("image %s: %s; retrying in %ss", image_id, outcome.detail, countdown)
        # The attempt counter was bumped; a retry is a new attempt, which is what we want.
        raise self.retry(countdown=countdown, max_retries=settings.fetch_retries)
    log.info("image %s: %s %s", image_id, outcome.status, outcome.detail)
    return outcome.status
