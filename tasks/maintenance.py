"""Housekeeping: re-announce images nobody will finish.

Run two ways: by beat (``requeue_stale_images`` every 5 minutes) and, so that recovery never
depends on the one beat process, by every ``catalog worker`` itself: a daemon thread in the
worker's main process (:class:`worker.pipeline.lease.Sweeper`, started on ``worker_ready``)
sweeps expired leases every ``CATALOG_LEASE_SWEEP_SECONDS``.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from tasks.base import DatabaseTask
from tasks.images import analyze_image
from worker.celery_app import REQUEUE_STALE_TASK, app
from worker.config import get_settings
from worker.pipeline.sweep import Sweeper, sweep_once

log = logging.getLogger(__name__)


@app.task(bind=True, base=DatabaseTask, name=REQUEUE_STALE_TASK)
def requeue_stale_images(self: DatabaseTask) -> int:
    """Re-announce images whose run died (expired lease) or whose message was lost (pending
    longer than CATALOG_STALE_AFTER with no run). Analysis is idempotent and a live run's
    lease makes a duplicate message a no-op, so a spurious re-run costs only a dequeue."""
    with self.open_session() as session:
        ids = sweep_once(session, self.settings)
    for image_id in ids:
        analyze_image.delay(image_id)
    return len(ids)


_sweeper: Sweeper | None = None


@worker_ready.connect
def _start_sweeper(sender: Any = None, **_kwargs: Any) -> None:
    global _sweeper
    if _sweeper is None:
        _sweeper = Sweeper(get_settings(), announce=lambda image_id: analyze_image.delay(image_id))
        _sweeper.start()


@worker_shutdown.connect
def _stop_sweeper(**_kwargs: Any) -> None:
    global _sweeper
    if _sweeper is not None:
        _sweeper.stop()
        _sweeper = None
