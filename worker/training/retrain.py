"""One retrain: lock, train each model, compare with its champion, promote or not, record.

Called by the ``tasks.training.retrain`` Celery task (queue ``train``, scheduled by beat) and by
``catalog retrain --now`` in the foreground: the same code, so a test of one is a test of both.
Each model gets a ``training_runs`` row (metrics of candidate and baseline, label counts,
duration, decision ``promoted``/``rejected``/``skipped``/``failed`` and the reason) and, when a
candidate was trained, a ``model_versions`` row and a PNG next to the artifact.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from db import models as m
from db.session import transaction
from worker.config import Settings
from worker.training import registry
from worker.training.attributes import attribute_targets, model_name
from worker.training.category import CategoryOutcome, train_category
from worker.training.fraud import FraudOutcome, train_fraud
from worker.training.plots import confusion_png, reliability_png

log = logging.getLogger(__name__)

WHAT = ("category", "fraud", "attribute", "detector")
DEFAULT_WHAT = ("category", "fraud", "attribute")
#: The Celery task of ``catalog backfill`` (tasks/training.py; routed to the train queue).
BACKFILL_TASK = "tasks.training.backfill"
MODEL_OF = {"category": registry.CATEGORY_HEAD, "fraud": registry.FRAUD_SCORER, "detector": "detector",
            "attribute": "attribute-head"}


@dataclass
class RunReport:
    what: str
    decision: str  # promoted | rejected | skipped | failed
    reason: str
    run_id: int | None = None
    version: str | None = None
    candidate: dict[str, Any] | None = None
    baseline: dict[str, Any] | None = None
    baseline_name: str | None = None


def decide_category(candidate: dict[str, Any], baseline: dict[str, Any], margin: float) -> tuple[bool, str]:
    """Better accuracy by ``margin`` and no class's recall lower by more than ``margin``."""
    gain = candidate["accuracy"] - baseline["accuracy"]
    if gain < margin:
        return False, (f"held-out accuracy {candidate['accuracy']:.4f} vs {baseline['accuracy']:.4f}: "
                       f"gain {gain:+.4f} below the margin {margin}")
    drops = {c: round(r - candidate["per_class_recall"].get(c, 0.0), 4)
             for c, r in baseline["per_class_recall"].items()
             if r - candidate["per_class_recall"].get(c, 0.0) > margin}
    if drops:
        return False, f"recall drops by more than {margin} on: " + ", ".join(f"{c} (-{d})" for c, d in drops.items())
    return True, f"held-out accuracy {candidate['accuracy']:.4f} vs {baseline['accuracy']:.4f} (gain {gain:+.4f})"


def decide_fraud(candidate: dict[str, Any], baseline: dict[str, Any], margin: float) -> tuple[bool, str]:
    """Lower held-out log loss by ``margin`` and AUC no lower by more than ``margin``."""
    gain = baseline["log_loss"] - candidate["log_loss"]
    if gain < margin:
        return False, (f"held-out log loss {candidate['log_loss']:.4f} vs {baseline['log_loss']:.4f}: "
                       f"improvement {gain:+.4f} below the margin {margin}")
    if candidate["auc"] is not None and baseline["auc"] is not None and candidate["auc"] < baseline["auc"] - margin:
        return False, f"AUC {candidate['auc']} vs {baseline['auc']}: worse by more than {margin}"
    return True, (f"held-out log loss {candidate['log_loss']:.4f} vs {baseline['log_loss']:.4f}, "
                  f"AUC {candidate['auc']} vs {baseline['auc']}")


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _train_one(settings: Settings, what: str, *, progress: bool, shuffle_labels: bool, seed: int,
               attribute: str | None = None) -> RunReport:
    url = settings.effective_database_url
    name = model_name(attribute) if attribute is not None else MODEL_OF[what]
    started = time.monotonic()
    with transaction(url) as session:
        run = m.TrainingRun(model_name=name, status="running",
                            params={"what": what, "seed": seed, "shuffle_labels": shuffle_labels,
                                    "margin": settings.promote_margin})
        session.add(run)
        session.flush()
        run_id = run.id
    report = RunReport(what if attribute is None else f"attribute:{attribute}", "failed", "", run_id)
    try:
        with transaction(url) as session:
            _train_and_decide(session, settings, what, name, run_id, report,
                              progress=progress, shuffle_labels=shuffle_labels, seed=seed, attribute=attribute)
    except Exception as exc:  # recorded on the run, then raised to the caller
        report.decision, report.reason = "failed", f"{type(exc).__name__}: {exc}"
        _finish(url, run_id, report, started)
        raise
    _finish(url, run_id, report, started)
    return report


def _train_and_decide(session: Any, settings: Settings, what: str, name: str, run_id: int, report: RunReport,
                      *, progress: bool, shuffle_labels: bool, seed: int, attribute: str | None = None) -> None:
    run = session.get_one(m.TrainingRun, run_id)
    if what == "attribute" and attribute is None:
        report.decision, report.reason = "skipped", "skipped: no reviewed attribute labels"
        return
    if what == "detector":
        report.decision = "skipped"
        report.reason = ("skipped: detector fine-tuning is not implemented yet "
                         "(optional; needs corrected boxes and a GPU)")
        return
    out_dir = registry.model_dir(settings, name) / "versions"
    champ_path = registry.current_champion_path(settings, name)
    outcome: CategoryOutcome | FraudOutcome | str
    if what == "category":
        outcome = train_category(session, out_dir, champ_path, seed=seed, shuffle_labels=shuffle_labels,
                                 progress=progress)
    elif what == "attribute":
        outcome = train_category(session, out_dir, champ_path, seed=seed, shuffle_labels=shuffle_labels,
                                 progress=progress, targets=attribute_targets(session).get(attribute or "", {}),
                                 what=name)
    else:
        outcome = train_fraud(session, out_dir, settings, champ_path, shuffle_labels=shuffle_labels, seed=seed)
    if isinstance(outcome, str):
        report.decision, report.reason = "skipped", f"skipped: {outcome}"
        return
    run.label_counts = outcome.counts
    if isinstance(outcome, CategoryOutcome):
        png = confusion_png(outcome.artifact.with_suffix(".confusion.png"), outcome.classes,
                            [row[:-1] for row in outcome.candidate["confusion"]],
                            f"{name} held-out accuracy {outcome.candidate['accuracy']:.3f}")
        better, why = decide_category(outcome.candidate, outcome.baseline, settings.promote_margin)
        extra: dict[str, Any] = {"training": outcome.training, "classes": outcome.classes}
    else:
        png = reliability_png(outcome.artifact.with_suffix(".reliability.png"), outcome.candidate["reliability"],
                              f"{name} held-out log loss {outcome.candidate['log_loss']}")
        better, why = decide_fraud(outcome.candidate, outcome.baseline, settings.promote_margin)
        extra = {"weights": outcome.weights}
    metrics = {"candidate": outcome.candidate, "baseline": outcome.baseline, "baseline_name": outcome.baseline_name,
               "plot": str(png), **extra}
    version = registry.register(session, name, outcome.artifact, metrics, run_id)
    run.model_version_id = version.id
    run.metrics = metrics
    report.version = f"{name}@{version.version}"
    report.candidate, report.baseline, report.baseline_name = outcome.candidate, outcome.baseline, outcome.baseline_name
    if better:
        registry.promote(session, settings, version)
        report.decision, report.reason = "promoted", f"better than {outcome.baseline_name}: {why}"
    else:
        report.decision, report.reason = "rejected", f"not better than {outcome.baseline_name}: {why}"


def _finish(url: str, run_id: int, report: RunReport, started: float) -> None:
    with transaction(url) as session:
        run = session.get_one(m.TrainingRun, run_id)
        run.status = "failed" if report.decision == "failed" else "succeeded"
        run.decision, run.reason = report.decision, report.reason
        run.error = report.reason if report.decision == "failed" else None
        run.finished_at = _now()
        run.params = {**(run.params or {}), "seconds": round(time.monotonic() - started, 2)}
    log.info("retrain %s: %s (%s)", report.what, report.decision, report.reason)


def run_retrain(settings: Settings, what: tuple[str, ...] | list[str] | None = None, *, progress: bool = False,
                shuffle_labels: bool = False, seed: int = 0) -> list[RunReport] | None:
    """Retrain ``what`` (default: category, fraud and one head per labelled attribute; the
    detector only when named) under the
    retrain lock. Returns None, having done nothing, when another retrain holds the lock."""
    chosen = list(what or DEFAULT_WHAT)
    unknown = [w for w in chosen if w not in WHAT]
    if unknown:
        raise ValueError(f"unknown retrain target(s) {', '.join(unknown)}; known: {', '.join(WHAT)}")
    with registry.retrain_lock(settings) as lock:
        if not lock.acquired:
            log.info("retrain skipped: another retrain holds the %s", lock.how)
            return None
        reports = []
        for w in chosen:
            attributes: list[str | None] = [None]
            if w == "attribute":  # one head per attribute that has labels (none: one skipped run)
                with transaction(settings.effective_database_url) as session:
                    attributes = list(attribute_targets(session)) or [None]
            reports += [_train_one(settings, w, progress=progress, shuffle_labels=shuffle_labels, seed=seed,
                                   attribute=a) for a in attributes]
        after_promotion(settings, reports)
        return reports


def after_promotion(settings: Settings, reports: list[RunReport]) -> None:
    """With CATALOG_BACKFILL_AFTER_PROMOTE, enqueue a backfill (train queue) for each promoted
    model, so images analysed with the previous version are analysed again."""
    if not settings.backfill_after_promote:
        return
    for report in reports:
        if report.decision == "promoted" and report.version:
            name = report.version.rsplit("@", 1)[0]
            from worker.celery_app import app

            app.send_task(BACKFILL_TASK, kwargs={"model": name})
            log.info("backfill of %s enqueued after its promotion", name)
