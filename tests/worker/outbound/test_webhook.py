"""The webhook: a signed POST of the same JSON, through the image-fetch SSRF fence, retried
with backoff by its task, then dead-lettered (issue 13, item 8)."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from db import models as m
from db.session import dispose_engines, session_factory
from tests.support.pipeline import analyze_all, apply, event, photo
from tests.support.services import unique
from tests.support.webhook import WebhookReceiver
from worker.config import ConfigError, get_settings, load_settings, reset_settings
from worker.outbound.publish import relay
from worker.outbound.schema import validate_payload
from worker.outbound.webhook import sign

SECRET = "whsec-test-" + "x" * 20


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as server:
        yield server


@pytest.fixture
def env(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, receiver: WebhookReceiver) -> Iterator[dict]:
    """An embedded-broker deployment (no results stream) with a webhook to the local receiver."""
    secret_file = tmp_path / "webhook-secret"
    secret_file.write_text(SECRET + "\n")
    for key, value in {"DATABASE_URL": db_url, "DATA_DIR": str(tmp_path / "data"), "STEPS": "metadata",
                       "FETCH_ALLOW_DIRS": str(tmp_path), "WEBHOOK_URL": receiver.url(),
                       "WEBHOOK_SECRET_FILE": str(secret_file), "FETCH_ALLOW_HOSTS": receiver.allow_entry,
                       "WEBHOOK_RETRIES": "2", "WEBHOOK_RETRY_MAX": "1"}.items():
        monkeypatch.setenv(f"CATALOG_{key}", value)
    yield {"url": db_url, "tmp": tmp_path}
    dispose_engines()


def processed_listing(env: dict) -> tuple[str, list[int]]:
    """Finish a listing and run the relay; returns the listing and the outbox ids handed out."""
    listing = unique("L")
    outcome = apply(env["url"], event(listing, [photo(env["tmp"] / "a.png")]))
    analyze_all(env["url"], get_settings(), outcome.images_to_analyze)
    with session_factory(env["url"])() as session:
        ids = list(session.scalars(select(m.OutboxEvent.id).where(m.OutboxEvent.listing_external_id == listing)))
    assert len(ids) == 1
    handed = relay(get_settings()).webhook_ids
    assert ids[0] in handed
    return listing, ids


def row(url: str, outbox_id: int) -> m.OutboxEvent:
    with session_factory(url)() as session:
        return session.get_one(m.OutboxEvent, outbox_id)


def dead_letters(url: str, event_id: str) -> list[m.DeadLetter]:
    with session_factory(url)() as session:
        return list(session.scalars(select(m.DeadLetter).where(m.DeadLetter.source == f"webhook:{event_id}")))


def test_webhook_receives_the_signed_event(env: dict, receiver: WebhookReceiver) -> None:
    from tasks.outbound import deliver_webhook

    _listing, (outbox_id,) = processed_listing(env)
    assert deliver_webhook.apply(args=(outbox_id,)).get() == "delivered"

    (got,) = receiver.received
    stored = row(env["url"], outbox_id)
    assert got.headers["X-Catalog-Event-Id"] == stored.event_id
    expected = "sha256=" + hmac.new(SECRET.encode(), got.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(got.headers["X-Catalog-Signature"], expected)
    assert got.headers["Content-Type"] == "application/json"
    body = json.loads(got.body)
    validate_payload(body)
    assert body == stored.payload and body["event_id"] == stored.event_id
    assert (stored.webhook_status, stored.webhook_attempts, stored.published_at is not None) == ("delivered", 1, True)
    assert SECRET.encode() not in got.body and SECRET not in json.dumps(dict(got.headers))
    # delivered once: running the task again (a duplicated message) posts nothing
    assert deliver_webhook.apply(args=(outbox_id,)).get() == "skipped" and len(receiver.received) == 1


def test_a_failing_endpoint_is_retried_then_dead_lettered(env: dict, receiver: WebhookReceiver) -> None:
    from tasks.outbound import deliver_webhook

    receiver.statuses = [500]
    _listing, (outbox_id,) = processed_listing(env)
    deliver_webhook.apply(args=(outbox_id,))  # eager: the task's retries run right here

    assert len(receiver.received) == 3  # the first POST and CATALOG_WEBHOOK_RETRIES=2 retries
    assert len({r.headers["X-Catalog-Event-Id"] for r in receiver.received}) == 1
    stored = row(env["url"], outbox_id)
    assert (stored.webhook_status, stored.webhook_attempts) == ("dead", 3)
    (dead,) = dead_letters(env["url"], stored.event_id)
    assert "gave up after 3 attempt(s)" in dead.reason and "HTTP 500" in dead.reason
    assert json.loads(dead.payload)["event_id"] == stored.event_id


def test_a_recovering_endpoint_gets_the_event_on_a_retry(env: dict, receiver: WebhookReceiver) -> None:
    from tasks.outbound import deliver_webhook

    receiver.statuses = [503, 200]
    _listing, (outbox_id,) = processed_listing(env)
    deliver_webhook.apply(args=(outbox_id,))
    assert len(receiver.received) == 2
    stored = row(env["url"], outbox_id)
    assert (stored.webhook_status, stored.webhook_attempts) == ("delivered", 2)
    assert dead_letters(env["url"], stored.event_id) == []


def test_a_target_the_fetch_fence_refuses_is_dead_lettered_at_once(env: dict, receiver: WebhookReceiver,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback is not allowed without CATALOG_FETCH_ALLOW_HOSTS, as for image URLs."""
    from tasks.outbound import deliver_webhook  # a first import caches the settings (worker.celery_app)

    monkeypatch.delenv("CATALOG_FETCH_ALLOW_HOSTS")
    reset_settings()  # so the delivery sees the environment without the allowance
    _listing, (outbox_id,) = processed_listing(env)
    deliver_webhook.apply(args=(outbox_id,))
    assert receiver.received == []
    stored = row(env["url"], outbox_id)
    assert (stored.webhook_status, stored.webhook_attempts) == ("dead", 1)
    (dead,) = dead_letters(env["url"], stored.event_id)
    assert "blocked_address" in dead.reason and "CATALOG_FETCH_ALLOW_HOSTS" in dead.reason


def test_relay_hands_each_pending_delivery_out_once(env: dict) -> None:
    _listing, (outbox_id,) = processed_listing(env)
    assert outbox_id not in relay(get_settings()).webhook_ids  # queued: not handed out again
    assert row(env["url"], outbox_id).webhook_status == "queued"


def test_signature_is_hmac_sha256_of_the_body() -> None:
    assert sign(b"{}", "k") == "sha256=" + hmac.new(b"k", b"{}", hashlib.sha256).hexdigest()


def test_webhook_settings_are_checked_at_start_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="CATALOG_WEBHOOK_SECRET .* is required when CATALOG_WEBHOOK_URL"):
        load_settings(data_dir=tmp_path, webhook_url="https://shop.example/hook")
    with pytest.raises(ConfigError, match="CATALOG_WEBHOOK_URL: must be an http"):
        load_settings(data_dir=tmp_path, webhook_url="ftp://shop.example/hook", webhook_secret="s")
    with pytest.raises(ConfigError, match="CATALOG_RESULTS_REDIS_URL: must be a redis"):
        load_settings(data_dir=tmp_path, results_redis_url="http://r")
    monkeypatch.setenv("CATALOG_WEBHOOK_URL", "https://shop.example/hook")
    monkeypatch.setenv("CATALOG_WEBHOOK_SECRET", "")
    with pytest.raises(ConfigError) as caught:
        load_settings(data_dir=tmp_path)
    secret = tmp_path / "s"
    secret.write_text("from-a-file\n")
    monkeypatch.delenv("CATALOG_WEBHOOK_SECRET")
    monkeypatch.setenv("CATALOG_WEBHOOK_SECRET_FILE", str(secret))
    settings = load_settings(data_dir=tmp_path)
    assert settings.webhook_secret is not None and settings.webhook_secret.get_secret_value() == "from-a-file"
    assert "from-a-file" not in repr(settings) and "from-a-file" not in str(caught.value)


def test_start_up_check_names_the_variables_when_the_fence_refuses_the_target(tmp_path: Path) -> None:
    from worker.outbound.webhook import check_target

    base = {"data_dir": tmp_path, "webhook_secret": "k"}
    assert check_target(load_settings(data_dir=tmp_path)) is None  # no webhook
    problem = check_target(load_settings(**base, webhook_url="http://10.1.2.3:8080/hook"))
    assert problem is not None and problem.startswith("CATALOG_WEBHOOK_URL: refused to post to")
    assert "CATALOG_FETCH_ALLOW_HOSTS" in problem and "\n" not in problem
    assert check_target(load_settings(**base, webhook_url="http://10.1.2.3:8080/hook",
                                      fetch_allow_hosts="10.1.2.3:8080")) is None
    assert check_target(load_settings(**base, webhook_url="https://93.184.216.34/hook")) is None  # public
