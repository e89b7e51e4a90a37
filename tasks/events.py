"""Apply a listing event, then announce its images (after the commit)."""

from __future__ import annotations

import logging
from typing import Any

from tasks.base import DatabaseTask
from tasks.images import announce_images
from worker.celery_app import HANDLE_EVENT_TASK, app
from worker.intake.events import parse_event
from worker.observe import metrics, report
from worker.pipeline.events import apply_event

log = logging.getLogger(__name__)


@app.task(bind=True, base=DatabaseTask, name=HANDLE_EVENT_TASK)
def handle_event(self: DatabaseTask, event: dict[str, Any]) -> dict[str, Any]:
    elapsed = metrics.timer()
    parsed = parse_event(event)
    with self.open_session() as session, session.begin():
        outcome = apply_event(session, parsed)
    announce_images(outcome.images_to_analyze, self.settings, event_id=parsed.event_id)
    report.event_applied(event_id=parsed.event_id, event_type=parsed.type, listing=parsed.listing.id,
                         seller=parsed.listing.seller_id, outcome=outcome.outcome,
                         images_queued=len(outcome.images_to_analyze), seconds=elapsed())
    return {"outcome": outcome.outcome, "images": outcome.images_to_analyze}
