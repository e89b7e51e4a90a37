"""The shipped Grafana dashboard and the documented queries use only metrics the code exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def _exported() -> set[str]:
    """Metric names defined in worker/observe/metrics.py (counters with and without _total)."""
    source = (ROOT / "worker" / "observe" / "metrics.py").read_text()
    names = set(re.findall(r'"(catalog_[a-z0-9_]+)"', source))
    return names | {n.removesuffix("_total") for n in names}


def _base(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in _exported():
            return name.removesuffix(suffix)
    return name


def test_dashboard_parses_and_queries_exported_metrics() -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana" / "catalog-worker.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10
    used = {_base(n) for e in exprs for n in re.findall(r"catalog_[a-z0-9_]+", e)}
    assert used and used <= _exported(), used - _exported()
    for wanted in ("catalog_images", "catalog_step_duration_seconds", "catalog_queue_depth",
                   "catalog_stream_lag", "catalog_images_in_flight"):
        assert wanted in used


def test_operations_doc_lists_every_metric() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    source = (ROOT / "worker" / "observe" / "metrics.py").read_text()
    missing = sorted(n for n in set(re.findall(r'"(catalog_[a-z0-9_]+)"', source)) if n not in text)
    assert not missing, missing
