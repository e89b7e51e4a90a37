"""`catalog ingest`: Redis stream -> validated events -> Celery work.

Delivery guarantees: an entry is acknowledged (XACK) only after its task was handed to the
broker, so a crash between the two re-delivers the entry instead of losing it (at least once;
the event id makes the second delivery harmless). Entries a dead consumer left pending are
taken over with XAUTOCLAIM once they have been idle for ``ingest_claim_idle_ms``.

An entry that is not a valid event, for whatever reason (no ``event`` field, binary
garbage, too large, too deeply nested, wrong types, or an exception nobody anticipated), is
copied to the dead-letter stream with a code and the reason, then acknowledged, in one
MULTI: it is dead-lettered exactly once and never blocks the entries after it.

Consumers left in the group by dead ``catalog ingest`` processes are deleted once their
pending entries were claimed: with no pending entry and idle for longer than
``dead_consumer_idle_ms``, checked and deleted atomically in one Lua script so an entry
can never be delivered to a consumer between the check and the delete (which would lose it).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from worker.config import Settings
from worker.intake.events import (
    MAX_EVENT_BYTES,
    NO_EVENT_FIELD,
    UNPARSEABLE,
    InvalidEvent,
    ListingEvent,
    parse_event,
    printable,
)
from worker.observe import metrics, report

log = logging.getLogger(__name__)

#: A consumer with nothing pending and idle this long belongs to a dead process (a live
#: one reads every few seconds). Overridden by ``Settings.ingest_dead_consumer_idle_ms``
#: where that setting exists.
DEAD_CONSUMER_IDLE_MS = 600_000
#: How often a running ingest looks for dead consumers.
CONSUMER_CLEANUP_INTERVAL_S = 60.0
#: Longest reason written to a dead letter (many validation errors can add up).
MAX_REASON_CHARS = 2000
#: How often the ingest loop refreshes its heartbeat key, and how long the key lives without it
#: (`catalog health ingest` reads it).
HEARTBEAT_INTERVAL_S = 10.0
HEARTBEAT_TTL_S = 300


def heartbeat_key(stream: str, host: str) -> str:
    """The key a running `catalog ingest` on ``host`` refreshes: {"consumer", "at" (epoch s)}."""
    return f"{stream}:heartbeat:{host}"

# Check and delete in one atomic step: the consumer cannot receive an entry in between.
# ARGV: group, the caller's own consumer name (never deleted), idle threshold in ms.
_DELETE_DEAD_CONSUMERS = """
local deleted = {}
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['name'] ~= ARGV[2] and tonumber(info['pending']) == 0
      and tonumber(info['idle']) >= tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    table.insert(deleted, info['name'])
  end
end
return deleted
"""

Publish = Callable[[ListingEvent], None]


@dataclass
class IngestStats:
    queued: int = 0
    dead_lettered: int = 0
    reclaimed: int = 0
    consumers_removed: int = 0


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def celery_publisher() -> Publish:
    """Publish by task name: the intake layer never imports the task modules."""
    from worker.celery_app import HANDLE_EVENT_TASK, app

    def publish(event: ListingEvent) -> None:
        # A task id derived from the event id makes duplicates easy to spot in broker logs.
        app.send_task(HANDLE_EVENT_TASK, args=[event.model_dump(mode="json")],
                      task_id=f"event-{event.event_id}")

    return publish


class StreamIngestor:
    def __init__(self, client: redis.Redis, settings: Settings, publish: Publish,
                 consumer: str | None = None, batch: int = 50, block_ms: int = 2000,
                 dead_consumer_idle_ms: int | None = None) -> None:
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            # Decoding happens while the reply is read: one binary entry would make every
            # read fail before the entry could be dead-lettered.
            raise ValueError("the ingest Redis client must not decode responses (decode_responses=False)")
        self.client = client
        self.settings = settings
        self.publish = publish
        self.stream = settings.events_stream
        self.group = settings.events_group
        self.consumer = consumer or default_consumer_name()
        self.batch = batch
        self.block_ms = block_ms
        if dead_consumer_idle_ms is None:
            dead_consumer_idle_ms = getattr(settings, "ingest_dead_consumer_idle_ms", DEAD_CONSUMER_IDLE_MS)
        self.dead_consumer_idle_ms = dead_consumer_idle_ms
        self.stats = IngestStats()
        self._stop = False
        self._next_cleanup = 0.0
        self._next_heartbeat = 0.0

    def ensure_group(self) -> None:
        try:
            # "0": a new group starts from the beginning, so events written before the first
            # `catalog ingest` ever ran are not skipped.
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            log.info("created consumer group %s on %s", self.group, self.stream)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def stop(self, *_args: object) -> None:
        self._stop = True

    def run(self, burst: bool = False, max_events: int | None = None) -> IngestStats:
        """Consume until stopped (SIGTERM/SIGINT), or, with ``burst``, until the stream has
        nothing new and nothing pending. Outside burst mode a lost Redis or broker connection
        is logged and retried with backoff instead of ending the process -- at start-up too,
        so a Redis that comes up after `catalog ingest` is waited for."""
        log.info("ingest: stream=%s group=%s consumer=%s", self.stream, self.group, self.consumer)
        backoff = 0.0
        group_ready = False
        while not self._stop:
            try:
                if not group_ready:
                    self.ensure_group()
                    group_ready = True
                handled = self._reclaim()
                self._cleanup_consumers_when_due()
                handled += self._read_new(block_ms=200 if burst else self.block_ms)
                self._heartbeat_when_due()
            except Exception as exc:  # Redis or the broker is away: nothing was acked, retry
                if burst:
                    raise
                backoff = min(max(backoff * 2, 1.0), 30.0)
                log.warning("ingest: %s: %s; retrying in %.0f s (unacked entries stay pending)",
                            type(exc).__name__, exc, backoff)
                time.sleep(backoff)
                continue
            backoff = 0.0
            if max_events is not None and self.stats.queued + self.stats.dead_lettered >= max_events:
                break
            if burst and handled == 0 and not self._own_pending():
                break
        self._clear_heartbeat()
        log.info("ingest stopped: %s", self.stats)
        return self.stats

    def _heartbeat_when_due(self) -> None:
        now = time.monotonic()
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + HEARTBEAT_INTERVAL_S
        self.client.set(heartbeat_key(self.stream, socket.gethostname()),
                        json.dumps({"consumer": self.consumer, "at": time.time()}), ex=HEARTBEAT_TTL_S)

    def _clear_heartbeat(self) -> None:
        """A stopped ingest reports nothing: its heartbeat goes at once, not after its TTL."""
        if not self._next_heartbeat:
            return
        try:
            self.client.delete(heartbeat_key(self.stream, socket.gethostname()))
        except redis.RedisError as exc:  # it expires on its own
            log.debug("ingest: heartbeat not removed: %s", exc)

    def _own_pending(self) -> int:
        info = self.client.xpending_range(self.stream, self.group, min="-", max="+", count=1,
                                          consumername=self.consumer)
        return len(info)

    def _reclaim(self) -> int:
        start, handled = "0-0", 0
        while True:
            reply = self.client.xautoclaim(self.stream, self.group, self.consumer,
                                           min_idle_time=self.settings.ingest_claim_idle_ms,
                                           start_id=start, count=self.batch)
            start, entries = reply[0], reply[1]
            for entry_id, fields in entries:
                if fields is None:  # deleted from the stream while pending
                    self.client.xack(self.stream, self.group, entry_id)
                    continue
                self.stats.reclaimed += 1
                self._handle(entry_id, fields)
                handled += 1
            if start in (b"0-0", "0-0") or not entries:
                return handled

    def _cleanup_consumers_when_due(self) -> None:
        now = time.monotonic()
        if now < self._next_cleanup:
            return
        self._next_cleanup = now + CONSUMER_CLEANUP_INTERVAL_S
        try:
            self.remove_dead_consumers()
        except redis.ResponseError as exc:  # e.g. EVAL not permitted for this user: housekeeping only
            log.warning("ingest: cannot remove dead consumers: %s", exc)

    def remove_dead_consumers(self) -> list[str]:
        """Delete the group's consumers that have nothing pending and have been idle for
        ``dead_consumer_idle_ms``, never this one; return their names.

        Run after ``_reclaim``: that takes over a dead consumer's pending entries, and
        this then removes the consumer. A live consumer that happens to be removed while
        it is quiet loses nothing (it had nothing pending) and is re-created by its next read.
        """
        names = self.client.eval(_DELETE_DEAD_CONSUMERS, 1, self.stream, self.group, self.consumer,
                                 self.dead_consumer_idle_ms)
        removed = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names or []]
        if removed:
            self.stats.consumers_removed += len(removed)
            log.info("removed %d dead consumer(s) from group %s: %s", len(removed), self.group,
                     ", ".join(removed))
        return removed

    def _read_new(self, block_ms: int) -> int:
        # redis-py types replies loosely (sync and async share the stubs): this one is a list
        # of [stream, [(entry id, fields)...]].
        reply: Any = self.client.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                            count=self.batch, block=block_ms)
        handled = 0
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                self._handle(entry_id, fields)
                handled += 1
        return handled

    def _handle(self, entry_id: bytes | str, fields: dict[Any, Any]) -> None:
        elapsed = metrics.timer()
        raw = fields.get(b"event", fields.get("event"))
        try:
            if raw is None:
                raise InvalidEvent("stream entry has no 'event' field", NO_EVENT_FIELD)
            event = parse_event(raw)
        except InvalidEvent as exc:
            self._dead_letter(entry_id, raw, exc.code, str(exc))
            return
        except Exception as exc:  # a payload nobody anticipated must not block the stream
            log.exception("entry %r could not be parsed", entry_id)
            self._dead_letter(entry_id, raw, UNPARSEABLE, f"cannot be parsed: {type(exc).__name__}: {exc}")
            return
        # If publishing fails we do not ack: the entry stays pending and is claimed again.
        self.publish(event)
        self.client.xack(self.stream, self.group, entry_id)
        self.stats.queued += 1
        report.event_ingested(event_id=event.event_id, event_type=event.type, listing=event.listing.id,
                              seller=event.listing.seller_id, entry_id=_text(entry_id), seconds=elapsed())

    def _dead_letter(self, entry_id: bytes | str, raw: object, code: str, reason: str) -> None:
        if raw is None:
            payload = b""
        elif isinstance(raw, (bytes, str)):
            payload = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
        else:
            payload = json.dumps(raw).encode()
        size = len(payload)
        ident = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        reason = printable(reason)
        if len(reason) > MAX_REASON_CHARS:
            reason = reason[:MAX_REASON_CHARS - 3] + "..."
        pipe = self.client.pipeline(transaction=True)
        # The payload is copied byte for byte (Redis strings are binary-safe), so it can be
        # replayed after a fix; only an oversized one is cut, at the event size limit.
        pipe.xadd(self.settings.dead_letter_stream,
                  {"source_id": ident, "stream": self.stream, "code": code, "reason": reason,
                   "payload": payload[:MAX_EVENT_BYTES], "payload_size": str(size),
                   "at": str(time.time())})
        pipe.xack(self.stream, self.group, entry_id)
        pipe.execute()
        self.stats.dead_lettered += 1
        log.warning("dead-lettered entry %s (%s): %s", ident, code, reason,
                    extra={"entry_id": ident, "outcome": "dead_lettered", "code": code, "stage": "ingest"})
        metrics.dead_lettered(code)


def _text(entry_id: bytes | str) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def run_ingest(settings: Settings, burst: bool = False, max_events: int | None = None,
               consumer: str | None = None) -> IngestStats:
    client = redis.Redis.from_url(settings.effective_redis_url, socket_timeout=30,
                                  health_check_interval=30)
    ingestor = StreamIngestor(client, settings, celery_publisher(), consumer=consumer)
    signal.signal(signal.SIGTERM, ingestor.stop)
    signal.signal(signal.SIGINT, ingestor.stop)
    return ingestor.run(burst=burst, max_events=max_events)
