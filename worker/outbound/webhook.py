"""POST ``listing.processed`` to CATALOG_WEBHOOK_URL, signed, through the image-fetch SSRF fence.

* Body: the exact JSON of the outbox row (the same text as the stream entry's ``event`` field).
* Headers: ``X-Catalog-Signature: sha256=<hex HMAC-SHA256 of the body with
  CATALOG_WEBHOOK_SECRET>``, ``X-Catalog-Event-Id`` (dedupe on it: delivery is at least once),
  ``X-Catalog-Event-Type``, ``Content-Type: application/json``.
* The target is vetted like an image URL (:mod:`worker.io.fetch`): its host is resolved here,
  every address must be public or allowed by CATALOG_FETCH_ALLOW_HOSTS, and the connection goes
  to the vetted address (Host header, TLS SNI and certificate name of the URL). Redirects are
  not followed.
* A 2xx answer delivers the event. Anything else (another status, a timeout, a refused
  connection) is retried by ``tasks.outbound.deliver_webhook`` with exponential backoff,
  CATALOG_WEBHOOK_RETRIES times; then the event is dead-lettered: ``webhook_status`` ``dead``
  on the outbox row and a ``dead_letters`` row (source ``webhook:<event id>``) with the reason,
  which ``catalog status`` counts. A target the fence refuses is dead-lettered at once.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import random
from dataclasses import dataclass
from typing import Any

import urllib3

import worker
from db import models as m
from db.session import transaction
from worker.config import Settings
from worker.io.deadline import Deadline
from worker.io.errors import ImageLoadError, describe_ref
from worker.io.fetch import _make_pool, _parse_http_url, _vet
from worker.outbound.outbox import encode

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Catalog-Signature"
EVENT_ID_HEADER = "X-Catalog-Event-Id"
_USER_AGENT = f"catalog-worker/{worker.__version__} (+webhook)"


class WebhookError(Exception):
    """One POST failed; ``permanent``: retrying cannot help (the target is refused)."""

    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


@dataclass(frozen=True)
class Delivery:
    status: str  # delivered | retry | dead | skipped
    detail: str = ""


def sign(body: bytes, secret: str) -> str:
    """The X-Catalog-Signature value: ``sha256=`` and the hex HMAC-SHA256 of the raw body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def retry_delay(retries: int, settings: Settings) -> float:
    """Seconds before retry ``retries + 1``: 2, 4, 8 ... capped at CATALOG_WEBHOOK_RETRY_MAX, the
    upper half drawn at random so that many events failing together do not come back in step."""
    bound = min(float(settings.webhook_retry_max), 2.0 * (2 ** retries))
    return bound / 2 + random.uniform(0, bound / 2)


def post(settings: Settings, body: bytes, event_id: str, event_type: str) -> int:
    """POST ``body`` to the webhook; the HTTP status on a 2xx, else :class:`WebhookError`."""
    url = settings.webhook_url
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
    if not url or not secret:
        raise WebhookError("CATALOG_WEBHOOK_URL or CATALOG_WEBHOOK_SECRET is no longer set", permanent=True)
    shown = describe_ref(url)
    headers = {"Content-Type": "application/json", "User-Agent": _USER_AGENT, EVENT_ID_HEADER: event_id,
               "X-Catalog-Event-Type": event_type, SIGNATURE_HEADER: sign(body, secret)}
    try:
        target = _parse_http_url(url, url)
        with Deadline(settings.webhook_timeout) as deadline:
            addresses = _vet(target, url, settings, deadline)
            return _post_first(target, addresses, body, headers, settings, deadline, shown)
    except ImageLoadError as exc:
        permanent = exc.code in ("blocked_address", "bad_reference")
        raise WebhookError(f"webhook {shown}: {exc.code}: {exc}", permanent=permanent) from None


def _post_first(target: Any, addresses: list[str], body: bytes, headers: dict[str, str],
                settings: Settings, deadline: Deadline, shown: str) -> int:
    last = "no address"
    for address in addresses:
        remaining = max(0.1, deadline.remaining())
        pool = _make_pool(target, address, urllib3.Timeout(connect=remaining, read=remaining), deadline)
        try:
            response = pool.urlopen("POST", target.request_uri, body=body,
                                    headers={"Host": target.host_header, **headers}, redirect=False,
                                    retries=False, assert_same_host=False, preload_content=True)
        except Exception as exc:  # noqa: BLE001 - any transport failure is retried
            last = "timed out" if deadline.fired else f"{type(exc).__name__}: {exc}"
            continue
        finally:
            pool.close()
            deadline.release()
        if 200 <= response.status < 300:
            return int(response.status)
        raise WebhookError(f"webhook {shown} answered HTTP {response.status}")
    raise WebhookError(f"webhook {shown} unreachable ({last})")


def check_target(settings: Settings) -> str | None:
    """One sentence naming the variables when CATALOG_WEBHOOK_URL can never be posted to (the
    fetch fence refuses its address), else None: a start-up check, so a webhook that could
    only dead-letter every event is caught before the first one. A host that does not resolve
    right now is not refused here (DNS may come back; deliveries retry)."""
    url = settings.webhook_url
    if not url:
        return None
    try:
        target = _parse_http_url(url, url)
        with Deadline(settings.webhook_timeout) as deadline:
            _vet(target, url, settings, deadline)
    except ImageLoadError as exc:
        if exc.code in ("blocked_address", "bad_reference"):
            reason = str(exc).replace("refused to fetch", "refused to post to")
            return f"CATALOG_WEBHOOK_URL: {reason}"
    return None


def deliver(settings: Settings, outbox_id: int, *, final: bool) -> Delivery:
    """One delivery attempt of the outbox row ``outbox_id``. ``final``: no retry follows, so a
    failure dead-letters the event. Returns what the caller (the task) does next."""
    url = settings.effective_database_url
    with transaction(url) as session:
        row = session.get(m.OutboxEvent, outbox_id)
        if row is None or row.webhook_status not in ("pending", "queued"):
            return Delivery("skipped", "nothing to deliver")
        body, event_id, event_type = encode(row.payload).encode(), row.event_id, row.type
        listing = row.listing_external_id
    try:
        status = post(settings, body, event_id, event_type)
    except WebhookError as exc:
        dead = exc.permanent or final
        with transaction(url) as session:
            row = session.get_one(m.OutboxEvent, outbox_id, with_for_update=True)
            row.webhook_attempts += 1
            row.webhook_error = exc.reason[:2000]
            if dead and row.webhook_status in ("pending", "queued"):
                row.webhook_status, row.webhook_at = "dead", m.utcnow()
                reason = (f"webhook gave up after {row.webhook_attempts} attempt(s): {exc.reason}"
                          if not exc.permanent else f"webhook refused: {exc.reason}")
                session.add(m.DeadLetter(source=f"webhook:{event_id}", payload=body.decode(), reason=reason[:2000]))
        if dead:
            log.error("listing %s: event %s dead-lettered: %s", listing, event_id, exc.reason)
            return Delivery("dead", exc.reason)
        log.warning("listing %s: event %s: %s; will retry", listing, event_id, exc.reason)
        return Delivery("retry", exc.reason)
    with transaction(url) as session:
        row = session.get_one(m.OutboxEvent, outbox_id, with_for_update=True)
        row.webhook_attempts += 1
        row.webhook_status, row.webhook_at, row.webhook_error = "delivered", m.utcnow(), None
    log.info("listing %s: event %s delivered to the webhook (HTTP %d)", listing, event_id, status)
    return Delivery("delivered", f"HTTP {status}")
