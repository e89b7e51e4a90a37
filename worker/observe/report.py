"""One log line (and the matching metrics) per event and per image, with the shop's ids.

Internal row ids alone do not let an operator find a listing: every line names the listing's
external id, and the event id where one is known. The structured fields are passed with
``extra=`` so that CATALOG_LOG_FORMAT=json carries them as keys:

* event: ``event_id, event_type, listing, seller, outcome, images_queued, duration_ms, stage``
  (``ingest``: taken from the stream; ``apply``: applied by the worker);
* image: ``image_id, listing, event_id, status, failure_code, duration_ms, decision`` (the
  listing's fraud decision when this image finished it, else null).
"""

from __future__ import annotations

import logging

from worker.observe import metrics

log = logging.getLogger("catalog.observe")


def failure_code(status: str, detail: str) -> str:
    """The code of a failed or retried image ("truncated", "blocked_address", ...): the text
    before the first colon of its reason; empty otherwise."""
    if status not in ("failed", "retry") or not detail:
        return ""
    head = detail.split(":", 1)[0].strip()
    return head if head.replace("_", "").isalnum() and len(head) <= 40 else "other"


def event_ingested(*, event_id: str, event_type: str, listing: str, seller: str, entry_id: str,
                   seconds: float) -> None:
    fields = {"event_id": event_id, "event_type": event_type, "listing": listing, "seller": seller,
              "outcome": "queued", "entry_id": entry_id, "duration_ms": round(seconds * 1000, 1),
              "stage": "ingest"}
    log.info("event %s (%s) listing %s seller %s: queued (stream entry %s) in %.1f ms", event_id,
             event_type, listing, seller, entry_id, seconds * 1000, extra=fields)
    metrics.event_ingested(event_type, "queued")


def event_applied(*, event_id: str, event_type: str, listing: str, seller: str, outcome: str,
                  images_queued: int, seconds: float) -> None:
    fields = {"event_id": event_id, "event_type": event_type, "listing": listing, "seller": seller,
              "outcome": outcome, "images_queued": images_queued,
              "duration_ms": round(seconds * 1000, 1), "stage": "apply"}
    log.info("event %s (%s) listing %s seller %s: %s, %d image(s) queued in %.1f ms", event_id,
             event_type, listing, seller, outcome, images_queued, seconds * 1000, extra=fields)
    metrics.event_applied(event_type, outcome)


def image_finished(*, image_id: int, listing: str | None, event_id: str | None, status: str,
                   detail: str, decision: str | None, seconds: float) -> None:
    code = failure_code(status, detail)
    fields = {"image_id": image_id, "listing": listing, "event_id": event_id, "status": status,
              "failure_code": code or None, "duration_ms": round(seconds * 1000, 1),
              "decision": decision, "detail": detail or None}
    finished = f"; listing finished: {decision}" if decision else ""
    level = logging.WARNING if status == "failed" else logging.INFO
    log.log(level, "image %s of listing %s: %s%s in %.0f ms%s", image_id, listing or "?", status,
            f" ({detail})" if detail else "", seconds * 1000, finished, extra=fields)
    metrics.image_finished(status, code, seconds)
