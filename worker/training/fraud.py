"""Fraud scorer: per-kind weights of the listing fraud score learnt from reviewers' verdicts.

``worker.fraud.score`` combines flags by noisy-OR: a flag of kind k with model score s is a
real problem with probability ``w_k * s``. A reviewer's verdict on one flag (label kind
``flag_verdict``: confirm = confirmed, reject = dismissed) is an observation of exactly that
event, so each ``w_k`` has a maximum-likelihood estimate from the verdicts on flags of kind k.
It is found by a fine grid search over [0.01, 1] (exact for one parameter, no optimiser to
tune), with a small pull towards the fixed weight so a kind with three verdicts does not jump
to an extreme. The probabilities are calibrated by construction (they maximise the likelihood
of the verdicts); the held-out reliability table and its expected calibration error say how
well.

Candidate and baseline (the champion's weights, else ``CATALOG_FRAUD_WEIGHTS``) are scored on
the held-out verdicts: log loss (the promotion metric), AUC and calibration. The artifact is a
JSON file ``{"weights": {...}, "review_threshold", "block_threshold"}`` usable as
``CATALOG_FRAUD_WEIGHTS``. Thresholds are carried over unchanged (too few ``hold`` verdicts to
learn them yet).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from db import models as m

EPS = 1e-4
MIN_VERDICTS = 10
GRID = np.linspace(0.01, 1.0, 100)
PRIOR = 1.0  # strength of the pull towards the fixed weight, in pseudo-verdicts


@dataclass
class Verdicts:
    kinds: list[str]
    scores: np.ndarray
    confirmed: np.ndarray  # 1 confirmed, 0 dismissed


def load_verdicts(session: Session) -> tuple[Verdicts, Verdicts]:
    """(train, held-out) verdicts joined with their flag's model score."""
    rows = session.execute(
        select(m.Label.split, m.Label.action, m.Flag.kind, m.Flag.score)
        .join(m.Flag, m.Flag.id == m.Label.flag_id)
        .where(m.Label.kind == "flag_verdict", m.Label.active.is_(True))
        .order_by(m.Label.id)).all()

    def pick(heldout: bool) -> Verdicts:
        chosen = [r for r in rows if (r.split == "heldout") == heldout]
        return Verdicts([r.kind for r in chosen], np.array([float(r.score) for r in chosen]),
                        np.array([1.0 if r.action == "confirm" else 0.0 for r in chosen]))

    return pick(False), pick(True)


def probabilities(v: Verdicts, weights: Mapping[str, float], default: float = 0.2) -> np.ndarray:
    w = np.array([float(weights.get(k, default)) for k in v.kinds])
    return np.clip(w * np.clip(v.scores, 0, 1), EPS, 1 - EPS)


def fit_weights(v: Verdicts, fixed: Mapping[str, float], default: float = 0.2) -> dict[str, float]:
    """Per-kind maximum-likelihood weight (with the pull towards ``fixed``)."""
    weights = dict(fixed)
    for kind in sorted(set(v.kinds)):
        mask = np.array([k == kind for k in v.kinds])
        s, y = np.clip(v.scores[mask], 0, 1), v.confirmed[mask]
        p = np.clip(GRID[:, None] * s[None, :], EPS, 1 - EPS)
        ll = (y * np.log(p) + (1 - y) * np.log(1 - p)).sum(1)
        ll -= PRIOR * (GRID - float(fixed.get(kind, default))) ** 2 * 10
        weights[kind] = round(float(GRID[int(ll.argmax())]), 3)
    return weights


def auc(p: np.ndarray, y: np.ndarray) -> float | None:
    """Probability that a confirmed verdict scores above a dismissed one (ties count half)."""
    pos, neg = p[y == 1], p[y == 0]
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return round(float(greater / (len(pos) * len(neg))), 4)


def calibration(p: np.ndarray, y: np.ndarray, n_bins: int = 10) -> tuple[list[dict[str, float]], float]:
    """Reliability bins and the expected calibration error (count-weighted |mean p - observed|)."""
    bins, ece = [], 0.0
    edges = np.linspace(0, 1, n_bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mask = (p >= lo) & ((p < hi) if hi < 1 else (p <= hi))
        count = int(mask.sum())
        mean_p = float(p[mask].mean()) if count else (lo + hi) / 2
        observed = float(y[mask].mean()) if count else 0.0
        bins.append({"lo": round(float(lo), 2), "mean_p": round(mean_p, 4), "observed": round(observed, 4),
                     "count": count})
        ece += count * abs(mean_p - observed)
    return bins, round(ece / max(1, len(p)), 4)


def metrics(v: Verdicts, weights: Mapping[str, float]) -> dict[str, Any]:
    p = probabilities(v, weights)
    y = v.confirmed
    log_loss = float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()) if len(y) else None
    bins, ece = calibration(p, y)
    return {"log_loss": None if log_loss is None else round(log_loss, 4), "auc": auc(p, y), "ece": ece,
            "heldout": len(y), "reliability": bins}


@dataclass
class FraudOutcome:
    artifact: Path
    candidate: dict[str, Any]
    baseline: dict[str, Any]
    baseline_name: str
    weights: dict[str, float]
    counts: dict[str, Any]


def train_fraud(session: Session, out_dir: Path, settings: Any, champion_path: Path | None, *,
                shuffle_labels: bool = False, seed: int = 0) -> FraudOutcome | str:
    """Fit the weights and score candidate and baseline on the held-out verdicts."""
    train, held = load_verdicts(session)
    counts = {"train": len(train.kinds), "heldout": len(held.kinds),
              "confirmed": int(train.confirmed.sum() + held.confirmed.sum()),
              "dismissed": int((1 - train.confirmed).sum() + (1 - held.confirmed).sum())}
    if len(train.kinds) < MIN_VERDICTS or not len(held.kinds):
        return (f"too few flag verdicts: {len(train.kinds)} train / {len(held.kinds)} held-out "
                f"(need {MIN_VERDICTS} train and 1 held-out)")
    baseline_weights: Mapping[str, float] = settings.fraud_weights
    baseline_name = "fixed weights (CATALOG_FRAUD_WEIGHTS)"
    if champion_path is not None:
        baseline_weights = json.loads(champion_path.read_text())["weights"]
        baseline_name = f"champion {champion_path}"
    if shuffle_labels:
        train = Verdicts(train.kinds, train.scores, np.random.default_rng(seed).permutation(train.confirmed))
    weights = fit_weights(train, settings.fraud_weights)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    out_dir.mkdir(parents=True, exist_ok=True)
    artifact = out_dir / f"weights-{stamp}-{seed}.json"
    artifact.write_text(json.dumps({"weights": weights, "review_threshold": settings.fraud_review_threshold,
                                    "block_threshold": settings.fraud_block_threshold}, indent=2, sort_keys=True))
    return FraudOutcome(artifact, metrics(held, weights), metrics(held, baseline_weights), baseline_name,
                        weights, counts)
