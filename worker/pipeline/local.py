"""Run the whole pipeline in this process, without a broker (`catalog process`, `catalog demo`).
"""

from __future__ import annotations

import hashlib
import logging
import sys
import uuid
from datetime import UTC, datetime

from worker.config import Settings

log = logging.getLogger("catalog")


def run_in_process(settings: Settings, refs: list[str], seller: str, category: str | None,
                   listing_id: str | None, title: str = "", progress: bool = True) -> str:
    """Run the whole pipeline here, without a broker: apply an event, analyse each image."""
    from db.session import session_factory
    from worker.intake.events import ListingEvent
    from worker.pipeline.analyze import analyze_image
    from worker.pipeline.events import apply_event
    from worker.pipeline.registry import validate_steps

    validate_steps(settings.steps)
    external_id = listing_id or "local-" + hashlib.sha256("\n".join(refs).encode()).hexdigest()[:16]
    event = ListingEvent.model_validate({
        "event_id": f"local-{uuid.uuid4()}",
        "type": "listing.updated",
        "occurred_at": datetime.now(UTC).isoformat(),
        "listing": {"id": external_id, "seller_id": seller, "title": title, "category": category,
                    "images": refs},
    })
    factory = session_factory(settings.effective_database_url)
    with factory() as session, session.begin():
        outcome = apply_event(session, event)
    show = progress and sys.stderr.isatty()
    from tqdm import tqdm

    for image_id in tqdm(outcome.images_to_analyze, desc="images", unit="img", disable=not show):
        with factory() as session:
            result = analyze_image(session, image_id, settings, max_attempts=settings.max_attempts)
        if not show:
            log.info("image %s: %s %s", image_id, result.status, result.detail)
    announce(settings)
    return external_id


def announce(settings: Settings) -> None:
    """Publish the listing.processed events this run recorded, when a results stream or a
    webhook is configured (neither is by default: a local run needs no Redis). Best effort: a
    failure is logged and the rows stay in the outbox for a deployment's relay sweep."""
    from worker.outbound.outbox import outbound_enabled
    from worker.outbound.publish import relay
    from worker.outbound.webhook import deliver

    if not outbound_enabled(settings):
        return
    try:
        report = relay(settings)
        for outbox_id in report.webhook_ids:  # one attempt here; no retries without a worker
            deliver(settings, outbox_id, final=False)
    except Exception as exc:  # noqa: BLE001 - the results are stored; announcing them is extra
        log.warning("could not publish listing.processed: %s", exc)
