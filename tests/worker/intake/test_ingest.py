"""The stream consumer against the real Redis server (the producer side is plain XADD).

Every test works on streams with unique names and deletes them afterwards (the
``stream_settings`` fixture), so nothing is left behind in the shared Redis database.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.support.services import REDIS_URL, unique
from worker.config import Settings
from worker.intake.events import MAX_EVENT_BYTES, MAX_EVENT_DEPTH, ListingEvent, parse_event
from worker.intake.ingest import StreamIngestor


def good_event(event_id: str) -> str:
    return json.dumps({"event_id": event_id, "type": "listing.created", "occurred_at": "2026-11-29T10:00:00Z",
                       "listing": {"id": "L-" + event_id, "seller_id": "S", "images": []}})


def deep_event(depth: int = 100_000) -> str:
    """A valid-looking event with an extra field nested deep enough to break ``json.loads``."""
    return '{"event_id": "deep", "extra": ' + "[" * depth + "]" * depth + "}"


@pytest.fixture
def stream_settings(make_settings, redis_client: redis.Redis) -> Iterator[Settings]:
    settings = make_settings(events_stream=unique("test:events"), events_group="g",
                             dead_letter_stream=unique("test:dead"), ingest_claim_idle_ms=1000)
    yield settings
    redis_client.delete(settings.events_stream, settings.dead_letter_stream)


def dead_letters(client: redis.Redis, settings: Settings) -> list[dict[bytes, bytes]]:
    entries: Any = client.xrange(settings.dead_letter_stream)
    return [fields for _id, fields in entries]


def consumers(client: redis.Redis, settings: Settings) -> dict[str, int]:
    """Consumer name -> number of pending entries."""
    info: Any = client.xinfo_consumers(settings.events_stream, settings.events_group)
    return {c["name"].decode(): c["pending"] for c in info}


def test_valid_events_are_published_then_acked_and_invalid_ones_dead_lettered(redis_client, stream_settings) -> None:
    s = stream_settings
    redis_client.xadd(s.events_stream, {"event": good_event("a")})
    redis_client.xadd(s.events_stream, {"event": "{broken"})
    redis_client.xadd(s.events_stream, {"other": "field"})
    redis_client.xadd(s.events_stream, {"event": good_event("b")})
    published: list[ListingEvent] = []
    stats = StreamIngestor(redis_client, s, published.append, consumer="c1", block_ms=100).run(burst=True)
    assert [e.event_id for e in published] == ["a", "b"]
    assert (stats.queued, stats.dead_lettered) == (2, 2)
    assert redis_client.xpending(s.events_stream, "g")["pending"] == 0
    dead = dead_letters(redis_client, s)
    reasons = [fields[b"reason"].decode() for fields in dead]
    assert reasons[0].startswith("not JSON") and "no 'event' field" in reasons[1]
    assert [fields[b"code"] for fields in dead] == [b"not_json", b"no_event_field"]
    assert dead[0][b"payload"] == b"{broken" and dead[0][b"payload_size"] == b"7"


def test_poison_first_a_deeply_nested_entry_does_not_block_the_valid_one_after_it(
        redis_client, stream_settings) -> None:
    """Issue 12 item 3: json.loads raised RecursionError, the entry was never acked, and the
    valid event after it on the same stream was never processed."""
    s = stream_settings
    poison_id = redis_client.xadd(s.events_stream, {"event": deep_event()})
    redis_client.xadd(s.events_stream, {"event": good_event("after-poison")})
    published: list[ListingEvent] = []
    stats = StreamIngestor(redis_client, s, published.append, consumer="c1", block_ms=100).run(burst=True)
    assert [e.event_id for e in published] == ["after-poison"]
    assert (stats.queued, stats.dead_lettered) == (1, 1)
    assert redis_client.xpending(s.events_stream, "g")["pending"] == 0

    # A later ingest (after the claim idle time) finds nothing to redo: exactly one dead letter.
    time.sleep(1.1)
    again = StreamIngestor(redis_client, s, published.append, consumer="c2", block_ms=100).run(burst=True)
    assert (again.queued, again.dead_lettered, again.reclaimed) == (0, 0, 0)
    dead = dead_letters(redis_client, s)
    assert len(dead) == 1 and len(published) == 1
    assert dead[0][b"source_id"] == poison_id and dead[0][b"code"] == b"too_deep"
    assert f"more than {MAX_EVENT_DEPTH} levels".encode() in dead[0][b"reason"]


HOSTILE_ENTRIES: dict[str, tuple[dict[str, str | bytes], bytes]] = {
    "binary garbage": ({"event": b"\xff\xfe\x00\x80garbage"}, b"not_json"),
    "empty": ({"event": b""}, b"not_json"),
    "JSON array": ({"event": "[1, 2, 3]"}, b"not_an_object"),
    "JSON string": ({"event": '"listing"'}, b"not_an_object"),
    "wrong field types": ({"event": json.dumps({"event_id": 1, "type": ["x"], "occurred_at": {},
                                                "listing": "L"})}, b"invalid"),
    "missing event field": ({"evnt": good_event("typo")}, b"no_event_field"),
    "deep objects": ({"event": '{"a":' * 5000 + "1" + "}" * 5000}, b"too_deep"),
    "huge": ({"event": good_event("huge")[:-1] + ', "pad": "' + "x" * (2 * MAX_EVENT_BYTES) + '"}'}, b"too_large"),
    "NUL in seller_id": ({"event": good_event("nul").replace('"seller_id": "S"', '"seller_id": "S\\u0000"')},
                         b"invalid"),
    "naive timestamp": ({"event": good_event("naive").replace("10:00:00Z", "10:00:00")}, b"invalid"),
}


def test_every_kind_of_malformed_entry_is_dead_lettered_once_with_a_code(redis_client, stream_settings) -> None:
    s = stream_settings
    expected = []
    for n, (name, (fields, code)) in enumerate(HOSTILE_ENTRIES.items()):
        redis_client.xadd(s.events_stream, {"event": good_event(f"ok-{n}")})
        entry_id = redis_client.xadd(s.events_stream, fields)
        expected.append((entry_id, code, name, fields))
    redis_client.xadd(s.events_stream, {"event": good_event("last")})
    published: list[ListingEvent] = []
    stats = StreamIngestor(redis_client, s, published.append, consumer="c1", block_ms=100, batch=4).run(burst=True)

    assert [e.event_id for e in published] == [f"ok-{n}" for n in range(len(HOSTILE_ENTRIES))] + ["last"]
    assert stats.dead_lettered == len(HOSTILE_ENTRIES)
    assert redis_client.xpending(s.events_stream, "g")["pending"] == 0
    dead = dead_letters(redis_client, s)
    assert [(d[b"source_id"], d[b"code"]) for d in dead] == [(i, c) for i, c, _n, _f in expected]
    for record, (_id, _code, name, fields) in zip(dead, expected, strict=True):
        value = fields.get("event", b"")
        raw = value.encode() if isinstance(value, str) else value
        assert record[b"payload_size"] == str(len(raw)).encode(), name
        assert record[b"payload"] == raw[:MAX_EVENT_BYTES], name  # byte for byte, cut only when huge
        assert b"\x00" not in record[b"reason"], name
    nul = dead[list(HOSTILE_ENTRIES).index("NUL in seller_id")]
    assert nul[b"reason"].startswith(b"listing.seller_id: ") and b"NUL" in nul[b"reason"]


def test_an_unanticipated_exception_while_parsing_dead_letters_the_entry(
        redis_client, stream_settings, monkeypatch) -> None:
    s = stream_settings

    def buggy_parse(raw: bytes) -> ListingEvent:
        if b"trips-a-bug" in raw:
            raise KeyError("a parser bug")
        return parse_event(raw)

    monkeypatch.setattr("worker.intake.ingest.parse_event", buggy_parse)
    redis_client.xadd(s.events_stream, {"event": good_event("trips-a-bug")})
    redis_client.xadd(s.events_stream, {"event": good_event("fine")})
    published: list[ListingEvent] = []
    stats = StreamIngestor(redis_client, s, published.append, consumer="c1", block_ms=100).run(burst=True)
    assert [e.event_id for e in published] == ["fine"] and stats.dead_lettered == 1
    (dead,) = dead_letters(redis_client, s)
    assert dead[b"code"] == b"unparseable" and b"KeyError" in dead[b"reason"]


def test_a_decoding_client_is_refused(stream_settings) -> None:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            StreamIngestor(client, stream_settings, lambda _e: None)
    finally:
        client.close()


def test_entry_is_not_acked_when_publishing_fails_and_is_reclaimed(redis_client, stream_settings) -> None:
    s = stream_settings
    redis_client.xadd(s.events_stream, {"event": good_event("x")})

    def broken_broker(_event) -> None:
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        StreamIngestor(redis_client, s, broken_broker, consumer="dead-one", block_ms=100).run(burst=True)
    assert redis_client.xpending(s.events_stream, "g")["pending"] == 1

    published: list[ListingEvent] = []
    survivor = StreamIngestor(redis_client, s, published.append, consumer="survivor", block_ms=100)
    survivor.ensure_group()
    assert survivor._reclaim() == 0  # not idle long enough yet: the other consumer may be alive
    time.sleep(1.1)
    stats = survivor.run(burst=True)
    assert [e.event_id for e in published] == ["x"] and stats.reclaimed == 1
    assert redis_client.xpending(s.events_stream, "g")["pending"] == 0


# --- item 10: consumers of dead `catalog ingest` processes ---------------------------------

def test_dead_consumers_are_removed_once_nothing_is_pending_but_never_a_busy_one_or_itself(
        redis_client, stream_settings) -> None:
    s = stream_settings
    me = StreamIngestor(redis_client, s, lambda _e: None, consumer="me", block_ms=100, dead_consumer_idle_ms=300)
    me.ensure_group()
    for name in ("crashed", "gone", "me"):
        redis_client.xadd(s.events_stream, {"event": good_event(name)})
        redis_client.xreadgroup(s.events_group, name, {s.events_stream: ">"}, count=1)
    for name in ("gone", "me"):  # these acknowledged their entries before going quiet
        (entry,) = redis_client.xpending_range(s.events_stream, s.events_group, "-", "+", 1, consumername=name)
        redis_client.xack(s.events_stream, s.events_group, entry["message_id"])
    time.sleep(0.4)
    redis_client.xadd(s.events_stream, {"event": good_event("busy")})
    redis_client.xreadgroup(s.events_group, "busy", {s.events_stream: ">"}, count=1)
    assert consumers(redis_client, s) == {"crashed": 1, "gone": 0, "me": 0, "busy": 1}

    # "crashed" still holds an entry nobody has claimed: removing it would lose the entry.
    assert me.remove_dead_consumers() == ["gone"]
    assert consumers(redis_client, s) == {"crashed": 1, "me": 0, "busy": 1}

    time.sleep(0.7)  # crashed's entry is now idle past the claim time (1 s)
    # busy is alive and still working on its entry: XCLAIM to itself marks it fresh again.
    redis_client.xclaim(s.events_stream, s.events_group, "busy", 0,
                        [e["message_id"] for e in redis_client.xpending_range(
                            s.events_stream, s.events_group, "-", "+", 1, consumername="busy")], justid=True)
    assert me._reclaim() == 1
    assert me.remove_dead_consumers() == ["crashed"]
    assert set(consumers(redis_client, s)) == {"me", "busy"}


def test_a_running_ingest_removes_the_consumer_whose_entries_it_took_over(redis_client, stream_settings) -> None:
    s = stream_settings
    redis_client.xgroup_create(s.events_stream, s.events_group, id="0", mkstream=True)
    redis_client.xadd(s.events_stream, {"event": good_event("orphan")})
    redis_client.xreadgroup(s.events_group, "old-ingest-123", {s.events_stream: ">"}, count=1)
    time.sleep(1.1)
    published: list[ListingEvent] = []
    ingestor = StreamIngestor(redis_client, s, published.append, consumer="new", block_ms=100,
                              dead_consumer_idle_ms=500)
    stats = ingestor.run(burst=True)
    assert [e.event_id for e in published] == ["orphan"]
    assert stats.consumers_removed == 1 and "old-ingest-123" not in consumers(redis_client, s)


def test_the_default_dead_consumer_threshold_is_generous(stream_settings, redis_client) -> None:
    ingestor = StreamIngestor(redis_client, stream_settings, lambda _e: None)
    assert ingestor.dead_consumer_idle_ms >= 10 * stream_settings.ingest_claim_idle_ms


def test_events_written_before_the_group_existed_are_read(redis_client, stream_settings) -> None:
    s = stream_settings
    redis_client.xadd(s.events_stream, {"event": good_event("early")})
    published: list[ListingEvent] = []
    StreamIngestor(redis_client, s, published.append, consumer="c", block_ms=100).run(burst=True)
    assert [e.event_id for e in published] == ["early"]


def test_continuous_mode_survives_a_broker_outage(redis_client, stream_settings, monkeypatch) -> None:
    s = stream_settings
    redis_client.xadd(s.events_stream, {"event": good_event("outage")})
    calls: list[str] = []
    published: list[str] = []

    def flaky(event) -> None:
        calls.append(event.event_id)
        if len(calls) == 1:
            raise ConnectionError("broker restarting")
        published.append(event.event_id)

    monkeypatch.setattr("worker.intake.ingest.time.sleep", lambda _s: None)  # no real backoff in the test
    ingestor = StreamIngestor(redis_client, s, flaky, consumer="c", block_ms=100)
    # The failed entry stays pending and is claimed again once idle (1 s here).
    stats = ingestor.run(max_events=1)
    assert published == ["outage"] and stats.queued == 1


def test_continuous_mode_waits_for_redis_at_start_up(redis_client, stream_settings, monkeypatch) -> None:
    """Redis down when `catalog ingest` starts: the group creation is retried with backoff
    (issue 13) instead of the process ending with a traceback."""
    s = stream_settings
    redis_client.xadd(s.events_stream, {"event": good_event("late")})
    real_create = redis_client.xgroup_create
    attempts: list[int] = []
    delays: list[float] = []

    def down_twice(*args: Any, **kwargs: Any) -> Any:
        attempts.append(1)
        if len(attempts) <= 2:
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        return real_create(*args, **kwargs)

    monkeypatch.setattr(redis_client, "xgroup_create", down_twice)
    monkeypatch.setattr("worker.intake.ingest.time.sleep", delays.append)
    published: list[str] = []
    ingestor = StreamIngestor(redis_client, s, lambda e: published.append(e.event_id), consumer="c",
                              block_ms=100)
    stats = ingestor.run(max_events=1)
    assert len(attempts) == 3 and delays == [1.0, 2.0]
    assert published == ["late"] and stats.queued == 1


def test_burst_mode_still_fails_at_once_when_redis_is_down(stream_settings) -> None:
    client = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    ingestor = StreamIngestor(client, stream_settings, lambda e: None, consumer="c")
    with pytest.raises(redis.ConnectionError):
        ingestor.run(burst=True)
