"""`catalog ingest`: Redis stream -> validated events -> Celery work.

Delivery guarantees: an entry is acknowledged (XACK) only after its task was handed to the
broker, so a crash between the two re-delivers the entry instead of losing it (at least once;
the event id makes the second delivery harmless). Entries a dead consumer left pending are
taken over with XAUTOCLAIM once they have been idle for ``ingest_claim_idle_ms``. An entry
that is not a valid event is copied to the dead-letter stream with the reason, then
acknowledged: it never blocks the stream.
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

import redis

from worker.config import Settings
from worker.intake.events import InvalidEvent, ListingEvent, parse_event

log = logging.getLogger(__name__)

Publish = Callable[[ListingEvent], None]


@dataclass
class IngestStats:
    queued: int = 0
    dead_lettered: int = 0
    reclaimed: int = 0


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
                 consumer: str | None = None, batch: int = 50, block_ms: int = 2000) -> None:
        self.client = client
        self.settings = settings
        self.publish = publish
        self.stream = settings.events_stream
        self.group = settings.events_group
        self.consumer = consumer or default_consumer_name()
        self.batch = batch
        self.block_ms = block_ms
        self.stats = IngestStats()
        self._stop = False

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
        is logged and retried with backoff instead of ending the process."""
        self.ensure_group()
        log.info("ingest: stream=%s group=%s consumer=%s", self.stream, self.group, self.consumer)
        backoff = 0.0
        while not self._stop:
            try:
                handled = self._reclaim()
                handled += self._read_new(block_ms=200 if burst else self.block_ms)
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
        log.info("ingest stopped: %s", self.stats)
        return self.stats

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

    def _read_new(self, block_ms: int) -> int:
        reply = self.client.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                       count=self.batch, block=block_ms)
        handled = 0
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                self._handle(entry_id, fields)
                handled += 1
        return handled

    def _handle(self, entry_id: bytes | str, fields: dict) -> None:
        raw = fields.get(b"event", fields.get("event"))
        try:
            if raw is None:
                raise InvalidEvent("stream entry has no 'event' field")
            event = parse_event(raw)
        except InvalidEvent as exc:
            self._dead_letter(entry_id, raw, str(exc))
            return
        # If publishing fails we do not ack: the entry stays pending and is claimed again.
        self.publish(event)
        self.client.xack(self.stream, self.group, entry_id)
        self.stats.queued += 1

    def _dead_letter(self, entry_id: bytes | str, raw: object, reason: str) -> None:
        payload = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else json.dumps(raw)
        ident = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.settings.dead_letter_stream,
                  {"source_id": ident, "stream": self.stream, "reason": reason,
                   "payload": payload or "", "at": str(time.time())})
        pipe.xack(self.stream, self.group, entry_id)
        pipe.execute()
        self.stats.dead_lettered += 1
        log.warning("dead-lettered entry %s: %s", ident, reason)


def run_ingest(settings: Settings, burst: bool = False, max_events: int | None = None,
               consumer: str | None = None) -> IngestStats:
    client = redis.Redis.from_url(settings.effective_redis_url, socket_timeout=30,
                                  health_check_interval=30)
    ingestor = StreamIngestor(client, settings, celery_publisher(), consumer=consumer)
    signal.signal(signal.SIGTERM, ingestor.stop)
    signal.signal(signal.SIGINT, ingestor.stop)
    return ingestor.run(burst=burst, max_events=max_events)
