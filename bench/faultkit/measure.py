"""What a scenario sent (``Plan``), and what happened to it (``measure``).

The unit is the image: one image row per (listing, URL) is expected for every valid event.
At the end of the scenario's window each expected image is

* ``done`` or ``failed`` (its row says so); a failure of an image that was not poison is a
  *false failure*;
* ``stuck``: its row is still pending (or any other non-final state), or its event is still
  in the stream (pending in the consumer group or never read), so nothing has lost it yet but
  nothing will finish it within the window either;
* ``lost``: no row, and its event is neither applied nor in the stream any more (acknowledged
  and gone, or dead-lettered although valid).

A listing still not ``done`` although all its images are final counts as one more stuck
item, and so does a malformed entry still pending in the stream; a malformed entry that is
neither dead-lettered nor (where that is allowed) accepted as a listing counts as lost.
``duplicated`` sums the extra rows: listings per external id, images per (listing, URL),
step runs per (image, step), dead letters per stream entry.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import redis

GOOD_IMAGE_STATES = ("done", "failed")


@dataclass
class EventPlan:
    event_id: str
    listing: str
    urls: list[str]
    entry_ids: list[str] = field(default_factory=list)  # one per delivery (XADD)


@dataclass
class MalformedPlan:
    label: str
    entry_id: str
    #: a listing this entry may create instead of being dead-lettered (e.g. a NUL in a title
    #: that the worker chooses to strip): then it is accounted for too
    accepted_listing: str | None = None


@dataclass
class Plan:
    events: list[EventPlan] = field(default_factory=list)
    malformed: list[MalformedPlan] = field(default_factory=list)
    poison: set[str] = field(default_factory=set)  # URLs expected to end failed

    @property
    def listings(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for event in self.events:
            urls = out.setdefault(event.listing, [])
            urls.extend(u for u in event.urls if u not in urls)
        return out

    @property
    def images(self) -> int:
        return sum(len(urls) for urls in self.listings.values())

    @property
    def entries(self) -> int:
        return sum(len(e.entry_ids) for e in self.events) + len(self.malformed)


def text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _sid(entry_id: object) -> tuple[int, int]:
    """A stream entry id as a comparable (milliseconds, sequence) pair."""
    ms, _, seq = text(entry_id).partition("-")
    return int(ms), int(seq or 0)


def scalar(cur: Any, sql: str, *params: object) -> int:
    """The single integer a counting query returns."""
    cur.execute(sql, params)
    row = cur.fetchone()
    assert row is not None, sql
    return int(row[0] or 0)


def listings_done(dsn: str, plan: Plan) -> bool:
    """Are all expected listings ``done``? False while Postgres is away."""
    wanted = list(plan.listings)
    try:
        conn = psycopg2.connect(dsn)
    except psycopg2.Error:
        return False
    try:
        with conn.cursor() as cur:
            done = scalar(cur, "SELECT count(*) FROM listings WHERE external_id = ANY(%s) AND status = 'done'",
                          wanted)
            return done == len(wanted)
    except psycopg2.Error:
        return False
    finally:
        conn.close()


def stream_state(client: redis.Redis, stream: str, group: str, dead_stream: str) -> dict[str, Any]:
    """Entries pending in the group, the last id it delivered, dead letters by source entry,
    and what the Celery broker still holds (queued and unacknowledged messages)."""
    state: dict[str, Any] = {"pending": set(), "last_delivered": (0, 0), "group": False}
    try:
        for group_info in client.xinfo_groups(stream):
            if text(group_info["name"]) == group:
                state["group"] = True
                state["last_delivered"] = _sid(group_info["last-delivered-id"])
                state["lag"] = group_info.get("lag")
                state["consumers"] = group_info.get("consumers")
        if state["group"]:
            for item in client.xpending_range(stream, group, min="-", max="+", count=100_000):
                state["pending"].add(_sid(item["message_id"]))
    except redis.ResponseError:
        pass  # no stream or no group yet: nothing was read
    dead: Counter[tuple[int, int]] = Counter()
    for _id, fields in client.xrange(dead_stream) or []:
        dead[_sid((fields or {}).get(b"source_id", b"0-0"))] += 1
    state["dead"] = dead
    state["queued"] = {q: client.llen(q) for q in ("ingest", "gpu", "cpu")}
    state["unacked"] = client.hlen("unacked")
    return state


def _in_stream(entry: str, stream: dict[str, Any]) -> bool:
    sid = _sid(entry)
    return sid in stream["pending"] or sid > stream["last_delivered"]


def measure(dsn: str, plan: Plan, stream: dict[str, Any]) -> dict[str, Any]:
    """Count done / failed / stuck / lost / duplicated for ``plan`` (see the module docstring)."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("""SELECT l.external_id, l.status, i.url, i.status, i.error, i.attempts
                           FROM listings l LEFT JOIN images i ON i.listing_id = l.id""")
            rows = cur.fetchall()
            cur.execute("SELECT event_id FROM processed_events")
            applied = {r[0] for r in cur.fetchall()}
            extra = "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM {} GROUP BY {}) t"
            dup_listings = scalar(cur, extra.format("listings", "external_id"))
            dup_images = scalar(cur, extra.format("images", "listing_id, url"))
            dup_steps = scalar(cur, extra.format("step_runs", "image_id, step"))
            done_without_steps = scalar(cur, """SELECT count(*) FROM images i WHERE i.status = 'done'
                AND NOT EXISTS (SELECT 1 FROM step_runs s WHERE s.image_id = i.id)""")
            cur.execute("""SELECT count(*) FROM information_schema.columns
                           WHERE table_name = 'images' AND column_name = 'complete'""")
            has_complete = bool(cur.fetchall()[0][0])  # images.complete arrived with issue 12
            done_incomplete = scalar(cur, "SELECT count(*) FROM images WHERE status = 'done' AND NOT complete") \
                if has_complete else None
    finally:
        conn.close()

    listing_status = {ext: status for ext, status, *_ in rows}
    image_rows = {(ext, url): (status, error, attempts) for ext, _, url, status, error, attempts in rows if url}
    entries_of: dict[str, list[str]] = {}
    for event in plan.events:
        entries_of.setdefault(event.listing, []).extend(event.entry_ids)
    events_applied = {e.listing for e in plan.events if e.event_id in applied}

    c: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    attempts: list[int] = []
    reasons: Counter[str] = Counter()
    for listing, urls in plan.listings.items():
        in_stream = any(_in_stream(entry, stream) for entry in entries_of[listing])
        finals = 0
        for url in urls:
            row = image_rows.get((listing, url))
            if row is None:
                if listing not in events_applied and in_stream:
                    c["stuck"] += 1
                    reasons["event still in the stream"] += 1
                else:
                    c["lost"] += 1
                    dead = any(stream["dead"].get(_sid(e)) for e in entries_of[listing])
                    reasons["valid event dead-lettered" if dead else "no image row"] += 1
                continue
            status, error, tries = row
            attempts.append(tries or 0)
            if status not in GOOD_IMAGE_STATES:
                c["stuck"] += 1
                reasons[f"image {status}"] += 1
                continue
            finals += 1
            c[status] += 1
            if status == "failed":
                codes[(error or "").split(":", 1)[0]] += 1
                if url not in plan.poison:
                    c["false_failures"] += 1
        if finals == len(urls) and listing_status.get(listing) != "done":
            c["stuck"] += 1
            reasons[f"listing {listing_status.get(listing)} with every image final"] += 1
        if listing_status.get(listing) == "done":
            c["listings_done"] += 1

    for bad in plan.malformed:
        if stream["dead"].get(_sid(bad.entry_id)):
            c["malformed_dead_lettered"] += 1
        elif bad.accepted_listing and bad.accepted_listing in listing_status:
            c["malformed_accepted"] += 1
        elif _in_stream(bad.entry_id, stream):
            c["stuck"] += 1
            reasons[f"malformed entry ({bad.label}) still in the stream"] += 1
        else:
            c["lost"] += 1
            reasons[f"malformed entry ({bad.label}) vanished"] += 1

    dup_dead = sum(n - 1 for n in stream["dead"].values() if n > 1)
    duplicated = {"listings": dup_listings, "images": dup_images, "step_runs": dup_steps, "dead_letters": dup_dead}
    return {
        "events": len(plan.events), "entries": plan.entries, "malformed": len(plan.malformed),
        "listings": len(plan.listings), "listings_done": c["listings_done"],
        "images": plan.images, "done": c["done"], "failed": c["failed"],
        "false_failures": c["false_failures"], "stuck": c["stuck"], "lost": c["lost"],
        "duplicated": sum(duplicated.values()), "duplicated_by_table": duplicated,
        "failed_by_code": dict(codes), "why_stuck_or_lost": dict(reasons),
        "done_without_step_runs": done_without_steps, "done_incomplete": done_incomplete,
        "malformed_dead_lettered": c["malformed_dead_lettered"], "malformed_accepted": c["malformed_accepted"],
        "attempts_max": max(attempts, default=0), "attempts_total": sum(attempts),
        "stream_pending": len(stream["pending"]), "stream_lag": stream.get("lag"),
        "stream_consumers": stream.get("consumers"),
        "broker_queued": stream["queued"], "broker_unacked": stream["unacked"],
    }


#: log lines worth counting as evidence, by what they show
EVIDENCE = {
    "worker_lost": r"WorkerLostError|exited with 'signal 9",
    "gave_up": r"gave_up",
    "deadlock": r"deadlock detected",
    "soft_time_limit": r"SoftTimeLimitExceeded",
    "task_retry": r"retry: Retry in",
    "task_raised": r"raised unexpected",
    "db_unavailable": r"psycopg2\.OperationalError|database system is shutting down"
                      r"|terminating connection due to administrator",
    "recursion_error": r"RecursionError",
    "nul_character": r"NUL \(0x00\)",
    "dead_lettered": r"dead-lettered entry",
    "ingest_backoff": r"ingest: .*retrying in",
    "broker_lost": r"Connection to broker lost|Cannot connect to redis|ingest: ConnectionError",
    "restored_unacked": r"Restoring \d+ unacknowledged",
    "stale_requeued": r"re-queued \d+ stale",
}


def evidence(logs: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per pattern: how many log lines match, and the first one (shortened)."""
    found: dict[str, dict[str, Any]] = {}
    for key, pattern in EVIDENCE.items():
        regex = re.compile(pattern, re.IGNORECASE)
        count, first = 0, None
        for name, text in logs.items():
            for line in text.splitlines():
                if regex.search(line):
                    count += 1
                    if first is None:
                        first = f"{name}: {line.strip()[:300]}"
        if count:
            found[key] = {"lines": count, "first": first}
    return found
