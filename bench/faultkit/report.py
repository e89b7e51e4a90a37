"""The fault suite's report: one row per scenario, notes with the evidence, the verdict."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import Any


def passed(r: dict[str, Any], max_recovery: float) -> bool:
    """No harness error, the fault hit what it aimed at, everything done within ``max_recovery``
    seconds, and nothing stuck, lost, duplicated or falsely failed."""
    if "error" in r or not r.get("exercised", False):
        return False
    recovered = r.get("recovery_s") is not None and r["recovery_s"] <= max_recovery
    return recovered and all(r.get(k) == 0 for k in ("stuck", "lost", "duplicated", "false_failures"))


COLUMNS = ("scenario", "sent", "done", "failed", "false fail", "stuck", "lost", "dup", "recovery", "result")


def row(r: dict[str, Any], window: float) -> list[str]:
    if "error" in r and "images" not in r:
        return [r["scenario"], "-", "-", "-", "-", "-", "-", "-", "-", "ERROR"]
    rec = r.get("recovery_s")
    recovery = f"{rec:.0f} s" if rec is not None else f"> {window:.0f} s"
    sent = f"{r['events']} ev / {r['images']} img"
    if r.get("malformed"):
        sent += f" + {r['malformed']} bad"
    verdict = "pass" if r["passed"] else ("not exercised" if not r.get("exercised", True) else "FAIL")
    return [r["scenario"], sent, str(r["done"]), str(r["failed"]), str(r["false_failures"]), str(r["stuck"]),
            str(r["lost"]), str(r["duplicated"]), recovery, verdict]


def table(results: list[dict[str, Any]], window: float, markdown: bool = False) -> str:
    rows = [row(r, window) for r in results]
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*COLUMNS), *(fmt.format(*cells) for cells in rows)])


def notes(r: dict[str, Any]) -> str:
    parts = [f"{r['scenario']}: {r.get('fault', '')}"]
    if "error" in r:
        parts.append(f"harness error: {r['error']}")
    for key in ("images_in_flight_at_kill", "downloads_in_killed_worker", "images_in_flight_at_stop",
                "entries_pending_at_kill"):
        if key in r:
            parts.append(f"{key}={r[key]}")
    if r.get("fault_s") and r.get("recovery_s") is not None:
        after = r["recovery_s"] - r["fault_s"]
        parts.append(f"the fault lasted {r['fault_s']:.0f} s; all done {after:.0f} s after it ended")
    for key in ("failed_by_code", "why_stuck_or_lost"):
        if r.get(key):
            parts.append(f"{key}={r[key]}")
    if r.get("duplicated"):
        parts.append(f"duplicated_by_table={r['duplicated_by_table']}")
    if (r.get("stream_consumers") or 0) > 1:
        parts.append(f"consumers left in the group: {r['stream_consumers']} (one `catalog ingest` runs)")
    for key in ("broker_unacked", "stream_pending", "done_without_step_runs", "done_incomplete",
                "malformed_dead_lettered", "malformed_accepted", "crash_kills", "unexpected_exits"):
        if r.get(key):
            parts.append(f"{key}={r[key]}")
    if "attempts_max" in r:
        parts.append(f"attempts max={r['attempts_max']} total={r['attempts_total']}, "
                     f"image fetches={r['image_fetches']}")
    found = r.get("evidence") or {}
    if found:
        parts.append("logs: " + ", ".join(f"{k} x{v['lines']}" for k, v in found.items()))
    return "\n    ".join(parts)


def git_revision(root: Path) -> str:
    with contextlib.suppress(Exception):
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if rev:
            return rev + ("+dirty" if dirty else "")
    return "unknown"
