"""Periodic retraining from reviewed labels (the ``train`` queue; scheduled by beat with
CATALOG_RETRAIN_SCHEDULE). The work is ``worker.training.retrain.run_retrain``, the same code
``catalog retrain --now`` runs in the foreground."""

from __future__ import annotations

import logging

from tasks.base import DatabaseTask
from worker.celery_app import RETRAIN_TASK, app
from worker.training.retrain import BACKFILL_TASK, run_retrain

log = logging.getLogger(__name__)


@app.task(bind=True, base=DatabaseTask, name=RETRAIN_TASK, autoretry_for=(), acks_late=False)
def retrain(self: DatabaseTask, what: list[str] | None = None) -> list[dict[str, str]] | None:
    # Not retried and acknowledged on receipt: a retrain that failed is recorded on its run and
    # the next scheduled one tries again; redelivering an hour-long job would only repeat it.
    reports = run_retrain(self.settings, what)
    if reports is None:
        log.info("retrain: another retrain is running; nothing done")
        return None
    return [{"what": r.what, "decision": r.decision, "reason": r.reason, "version": r.version or ""}
            for r in reports]


@app.task(bind=True, base=DatabaseTask, name=BACKFILL_TASK, autoretry_for=(), acks_late=False)
def backfill(self: DatabaseTask, model: str, limit: int | None = None,
             rate: float | None = None) -> dict[str, object]:
    # Enqueued by the retrain after a promotion (CATALOG_BACKFILL_AFTER_PROMOTE). Resumable by
    # its cursor, so a lost message costs nothing a later `catalog backfill` cannot finish.
    from dataclasses import asdict

    from worker.training.backfill import backfill as run_backfill

    return asdict(run_backfill(self.settings, model, limit=limit, rate=rate))
