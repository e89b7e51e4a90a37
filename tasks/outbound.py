"""Outbound events (worker/outbound): publish the outbox and POST events to the webhook.

``relay_outbox`` runs every 15 s from beat (the sweep for leftovers, and pruning); the image
task calls :func:`relay_now` right after its commit so a finished listing is announced at once.
``deliver_webhook`` makes one POST per run and retries itself with backoff
(CATALOG_WEBHOOK_RETRIES, CATALOG_WEBHOOK_RETRY_MAX) before the event is dead-lettered.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_ready

from tasks.base import DatabaseTask
from worker.celery_app import DELIVER_WEBHOOK_TASK, RELAY_OUTBOX_TASK, app
from worker.config import Settings, get_settings
from worker.outbound.outbox import outbound_enabled
from worker.outbound.publish import prune, relay
from worker.outbound.webhook import check_target, deliver, retry_delay

log = logging.getLogger(__name__)


def relay_now(settings: Settings) -> None:
    """Best effort, after a commit that may have recorded events: whatever fails here is left
    to the beat sweep, and never fails the caller's task."""
    if not outbound_enabled(settings):
        return
    try:
        report = relay(settings)
        for outbox_id in report.webhook_ids:
            deliver_webhook.delay(outbox_id)
    except Exception as exc:  # noqa: BLE001 - the sweep publishes what this missed
        log.warning("outbox relay after commit failed (the beat sweep retries): %s", exc)


@app.task(bind=True, base=DatabaseTask, name=RELAY_OUTBOX_TASK)
def relay_outbox(self: DatabaseTask) -> int:
    report = relay(self.settings)
    for outbox_id in report.webhook_ids:
        deliver_webhook.delay(outbox_id)
    report.pruned = prune(self.settings) if outbound_enabled(self.settings) else 0
    return report.published


@app.task(bind=True, base=DatabaseTask, name=DELIVER_WEBHOOK_TASK)
def deliver_webhook(self: DatabaseTask, outbox_id: int) -> str:
    settings = self.settings
    retries = self.work_retries  # retries caused by a database outage do not count here
    outcome = deliver(settings, outbox_id, final=retries >= settings.webhook_retries)
    if outcome.status == "retry":
        raise self.retry(countdown=retry_delay(retries, settings), max_retries=self.request.retries + 1)
    return outcome.status


@worker_ready.connect
def _check_webhook(sender: Any = None, **_kwargs: Any) -> None:
    """Say at start-up, in one line, when the webhook's address is refused (every event would
    be dead-lettered)."""
    problem = check_target(get_settings())
    if problem:
        log.error("%s; every listing.processed POST would be dead-lettered", problem)
