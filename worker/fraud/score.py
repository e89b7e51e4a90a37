"""One fraud score per listing, from the flags of all its images.

``fraud_score`` is a pure function: give it the listing's flags (pipeline ``Flag``s or
``flags`` rows) and the settings, get a score in [0, 1] and a decision.

How flags combine (noisy-OR): each flag kind counts once, with its strongest flag;
kind k contributes ``p_k = weight_k * score_k`` and the listing score is
``1 - prod(1 - p_k)``. Independent signals add up (contact details *and* a stolen photo score
higher than either) without ever exceeding 1, and a weak signal (low_quality) barely moves it.
Reviewer verdicts override the model: a dismissed flag counts for nothing, a confirmed one
counts with score 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

DECISIONS = ("ok", "review", "hold")


@dataclass(frozen=True)
class FraudScore:
    score: float
    decision: str  # ok | review | hold
    contributions: dict[str, float] = field(default_factory=dict)  # kind -> weight * score

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "decision": self.decision, "contributions": self.contributions}


def fraud_score(flags: Iterable[Any], weights: Mapping[str, float], *,
                review_threshold: float = 0.5, block_threshold: float = 0.85,
                default_weight: float = 0.2) -> FraudScore:
    """Combine flags (objects with ``kind``, ``score`` and optionally ``status``)."""
    strongest: dict[str, float] = {}
    for flag in flags:
        status = getattr(flag, "status", None)
        if status == "dismissed":
            continue
        value = 1.0 if status == "confirmed" else float(flag.score)
        value = min(1.0, max(0.0, value))
        strongest[flag.kind] = max(strongest.get(flag.kind, 0.0), value)
    contributions = {
        kind: round(min(1.0, max(0.0, float(weights.get(kind, default_weight)))) * value, 4)
        for kind, value in strongest.items()
    }
    remaining = 1.0
    for p in contributions.values():
        remaining *= 1.0 - p
    score = round(1.0 - remaining, 4)
    if score >= block_threshold:
        decision = "hold"
    elif score >= review_threshold:
        decision = "review"
    else:
        decision = "ok"
    return FraudScore(score, decision, dict(sorted(contributions.items(), key=lambda kv: -kv[1])))


def fraud_score_for_settings(flags: Iterable[Any], settings: Any) -> FraudScore:
    return fraud_score(flags, settings.fraud_weights, review_threshold=settings.fraud_review_threshold,
                       block_threshold=settings.fraud_block_threshold)

