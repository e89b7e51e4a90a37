"""Periodic housekeeping (celery beat)."""

from __future__ import annotations

import logging
from datetime import timedelta

from tasks.base import DatabaseTask
from tasks.images import analyze_image
from worker.celery_app import REQUEUE_STALE_TASK, app
from worker.pipeline.sweep import stale_images

log = logging.getLogger(__name__)


@app.task(bind=True, base=DatabaseTask, name=REQUEUE_STALE_TASK)
def requeue_stale_images(self: DatabaseTask) -> int:
    """Re-announce images left pending (their message was lost, e.g. with an embedded broker
    whose worker died). Analysis is idempotent, so a spurious re-run costs only time."""
    with self.open_session() as session, session.begin():
        ids = stale_images(session, timedelta(seconds=self.settings.stale_after))
    for image_id in ids:
        analyze_image.delay(image_id)
    if ids:
        log.warning("re-queued %d stale image(s)", len(ids))
    return len(ids)
