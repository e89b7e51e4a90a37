"""Reading champion files on the hot path, without the registry (no database, no torch).

The registry (``worker.training.registry``) writes ``<models>/<name>/champion.*`` atomically on
promotion and rollback; the pipeline only needs to read them. This module is what the listing
fraud score uses: the promoted fraud-scorer weights when a champion exists, else the fixed
``CATALOG_FRAUD_WEIGHTS``. Each call costs one ``stat``; the file is parsed again only when its
path, mtime or size changed, so a promotion or rollback reaches running workers at their next
listing, like the category head.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.fraud.score import FraudScore, fraud_score
from worker.models.weights import file_sha256

log = logging.getLogger(__name__)

#: The fraud scorer's champion file, relative to the model directory (the registry's too).
FRAUD_CHAMPION = Path("fraud-scorer") / "champion.json"
FIXED = "fixed weights (CATALOG_FRAUD_WEIGHTS)"


@dataclass(frozen=True)
class FraudWeights:
    weights: dict[str, float]
    review_threshold: float
    block_threshold: float
    version: str  # "fraud-scorer@<8 hex>" (the registry's version of the file) or FIXED
    extra: dict[str, Any] = field(default_factory=dict)


_cache: dict[tuple[Any, ...], FraudWeights] = {}
_lock = threading.Lock()


def fraud_champion_path(settings: Any) -> Path:
    return Path(settings.effective_sr_model_dir) / FRAUD_CHAMPION


def _load(path: Path, settings: Any) -> FraudWeights:
    blob = json.loads(path.read_text())
    weights = {str(k): float(v) for k, v in dict(blob["weights"]).items()}
    return FraudWeights(weights, float(blob.get("review_threshold", settings.fraud_review_threshold)),
                        float(blob.get("block_threshold", settings.fraud_block_threshold)),
                        f"fraud-scorer@{file_sha256(path)[:8]}")


def fraud_weights(settings: Any) -> FraudWeights:
    """The weights the listing score uses now: the fraud-scorer champion when its file exists
    (and parses), else the configured fixed weights. A broken champion file is logged and
    ignored: scoring must not stop because of it."""
    fixed = FraudWeights(dict(settings.fraud_weights), settings.fraud_review_threshold,
                         settings.fraud_block_threshold, FIXED)
    path = fraud_champion_path(settings)
    try:
        stat = path.stat()
    except OSError:
        return fixed
    key = (str(path), stat.st_mtime_ns, stat.st_size, settings.fraud_review_threshold,
           settings.fraud_block_threshold)
    with _lock:
        cached = _cache.get(key)
    if cached is not None:
        return cached
    try:
        loaded = _load(path, settings)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("fraud-scorer champion %s unreadable (%s); using %s", path, exc, FIXED)
        return fixed
    with _lock:
        _cache.clear()  # one champion at a time: keep only the newest
        _cache[key] = loaded
    return loaded


def champion_fraud_score(flags: Iterable[Any], settings: Any) -> tuple[FraudScore, str]:
    """The listing score with the current weights, and the version of those weights."""
    w = fraud_weights(settings)
    score = fraud_score(flags, w.weights, review_threshold=w.review_threshold,
                        block_threshold=w.block_threshold)
    return score, w.version
