"""The stream consumer against the real Redis server (the producer side is plain XADD)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import unique
from worker.intake.ingest import StreamIngestor


def good_event(event_id: str) -> str:
    return json.dumps({"event_id": event_id, "type": "listing.created", "occurred_at": "2026-11-29T10:00:00Z",
                       "listing": {"id": "L-" + event_id, "seller_id": "S", "images": []}})


@pytest.fixture
def stream_settings(make_settings):  # noqa: ANN001, ANN201
    return make_settings(events_stream=unique("test:events"), events_group="g",
                         dead_letter_stream=unique("test:dead"), ingest_claim_idle_ms=1000)


def test_valid_events_are_published_then_acked_and_invalid_ones_dead_lettered(redis_client, stream_settings) -> None:  # noqa: ANN001
    s = stream_settings
    redis_client.xadd(s.events_stream, {"event": good_event("a")})
    redis_client.xadd(s.events_stream, {"event": "{broken"})
    redis_client.xadd(s.events_stream, {"other": "field"})
    redis_client.xadd(s.events_stream, {"event": good_event("b")})
    published = []
    stats = StreamIngestor(redis_client, s, published.append, consumer="c1", block_ms=100).run(burst=True)
    assert [e.event_id for e in published] == ["a", "b"]
    assert (stats.queued, stats.dead_lettered) == (2, 2)
    assert redis_client.xpending(s.events_stream, "g")["pending"] == 0
    dead = redis_client.xrange(s.dead_letter_stream)
    reasons = [fields[b"reason"].decode() for _id, fields in dead]
    assert reasons[0].startswith("not JSON") and "no 'event' field" in reasons[1]
    assert dead[0][1][b"payload"] == b"{broken"


def test_entry_is_not_acked_when_publishing_fails_and_is_reclaimed(redis_client, stream_settings) -> None:  # noqa: ANN001
    s = stream_settings
    redis_client.xadd(s.events_stream, {"event": good_event("x")})

    def broken_broker(_event) -> None:  # noqa: ANN001
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        StreamIngestor(redis_client, s, broken_broker, consumer="dead-one", block_ms=100).run(burst=True)
    assert redis_client.xpending(s.events_stream, "g")["pending"] == 1

    published = []
    survivor = StreamIngestor(redis_client, s, published.append, consumer="survivor", block_ms=100)
    survivor.ensure_group()
    assert survivor._reclaim() == 0  # not idle long enough yet: the other consumer may be alive
    import time

    time.sleep(1.1)
    stats = survivor.run(burst=True)
    assert [e.event_id for e in published] == ["x"] and stats.reclaimed == 1
    assert redis_client.xpending(s.events_stream, "g")["pending"] == 0


def test_events_written_before_the_group_existed_are_read(redis_client, stream_settings) -> None:  # noqa: ANN001
    s = stream_settings
    redis_client.xadd(s.events_stream, {"event": good_event("early")})
    published = []
    StreamIngestor(redis_client, s, published.append, consumer="c", block_ms=100).run(burst=True)
    assert [e.event_id for e in published] == ["early"]


def test_continuous_mode_survives_a_broker_outage(redis_client, stream_settings, monkeypatch) -> None:  # noqa: ANN001
    import worker.intake.ingest as ingest_mod

    s = stream_settings
    redis_client.xadd(s.events_stream, {"event": good_event("outage")})
    calls, published = [], []

    def flaky(event) -> None:  # noqa: ANN001
        calls.append(event.event_id)
        if len(calls) == 1:
            raise ConnectionError("broker restarting")
        published.append(event.event_id)

    monkeypatch.setattr(ingest_mod.time, "sleep", lambda _s: None)  # no real backoff in the test
    ingestor = StreamIngestor(redis_client, s, flaky, consumer="c", block_ms=100)
    # The failed entry stays pending and is claimed again once idle (1 s here).
    stats = ingestor.run(max_events=1)
    assert published == ["outage"] and stats.queued == 1
