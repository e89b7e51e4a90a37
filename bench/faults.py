"""Fault suite for the production wiring (issue 12, acceptance item 2).

    python -m bench.faults                          # all six scenarios (~20-30 min on 2 cores)
    python -m bench.faults --quick                  # fewer events per scenario
    python -m bench.faults --scenario worker_kill --scenario poison --json faults.json
    python -m bench.faults --set VISIBILITY_TIMEOUT=60   # a CATALOG_* setting for every process

It starts Postgres and Redis servers of its own (temporary directory, ports 55432 / 56379 or
the next free ones; never the machine's shared servers), a local image host, and the real
processes (`catalog db upgrade`, `catalog ingest`, two `catalog worker -Q ingest,gpu,cpu -c 2`
(``--workers``), `catalog beat`) with default settings except ``CATALOG_STEPS=metadata``
(delivery, not models) and ``CATALOG_DEVICE=cpu``. The image host answers after 1 s, so work is
in flight when a fault hits. Events are XADDed per the contract in docs/events.md. Each
scenario injects one fault, waits until every listing is ``done`` or its window (default
330 s after the fault) ends, then counts rows in Postgres (bench/faultkit/measure.py says
exactly how):

    worker_kill       SIGKILL one whole `catalog worker` mid-run, start a new one
    redis_restart     stop Redis (SIGTERM: AOF flushed) mid-run, 5 s down, start it again
    postgres_outage   stop Postgres (fast: clients cut off) mid-run for 30 s; events keep coming
    ingest_kill       SIGKILL `catalog ingest` while it holds read-but-unacknowledged entries
    duplicates        every event delivered 4 times back to back
    poison            images that kill their worker or hang, then malformed entries (not JSON,
                      missing fields, deeply nested JSON, a NUL in a title) before valid events

Recovery time runs from the fault (for duplicates and poison: the first XADD) to the moment
every listing is ``done``. A scenario passes when stuck, lost, duplicated and false failures
(good images failed) are 0 and recovery is within --max-recovery (300 s). It reports what
happened and hides nothing: the exit status is 1 when any scenario fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2

from bench.faultkit.deployment import ROOT, Deployment
from bench.faultkit.images import ImageHost
from bench.faultkit.measure import (
    EventPlan,
    MalformedPlan,
    Plan,
    evidence,
    listings_done,
    measure,
    scalar,
    stream_state,
    text,
)
from bench.faultkit.report import git_revision, notes, passed, table
from bench.faultkit.servers import PostgresServer, RedisServer, ServerError, free_port, missing_tools

STREAM, GROUP, DEAD = "catalog:events", "catalog-ingest", "catalog:events:dead"


@dataclass
class Options:
    quick: bool = False
    window: float = 330.0         # seconds after the fault before counting what is left
    max_recovery: float = 300.0   # acceptance: recovery (e.g. after a worker kill) under 5 min
    settle: float = 5.0           # after everything is done, wait for late duplicates
    latency: float = 1.0          # seconds the image host takes per image: work is in flight
    pg_outage: float = 30.0
    redis_downtime: float = 5.0
    workers: int = 2              # `catalog worker -c 2` processes ("any number of machines")
    overrides: dict[str, str] = field(default_factory=dict)
    keep: bool = False

    @property
    def listings(self) -> int:
        return 4 if self.quick else 12


@dataclass
class Injection:
    plan: Plan
    fault_at: float                       # time.monotonic() of the fault
    fault: str                            # what was done
    notes: dict[str, Any] = field(default_factory=dict)
    fault_s: float = 0.0                  # how long the fault lasted (an outage), 0 for a kill
    exercised: bool = True                # False: the fault missed what it was meant to hit


class Suite:
    """The servers every scenario shares; always torn down (also on Ctrl-C / SIGTERM)."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.root = Path(tempfile.mkdtemp(prefix="catalog-faults-"))
        os.chmod(self.root, 0o755)  # the postgres OS user must reach its directory
        self.pg = PostgresServer(self.root, free_port(55432))
        self.redis = RedisServer(self.root, free_port(56379))
        self.host = ImageHost(latency=opts.latency)

    def __enter__(self) -> Suite:
        try:
            self.pg.init()
            self._start(self.pg, 55432)
            self._start(self.redis, 56379)
            self.host.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _start(server: PostgresServer | RedisServer, base: int, tries: int = 5) -> None:
        # Other people's suites start servers on nearby ports too: a port taken between our
        # check and the server's bind is retried with the next free one.
        for attempt in range(tries):
            try:
                server.start()
                return
            except ServerError:
                if attempt == tries - 1:
                    raise
                server.port = free_port(base + 10 * (attempt + 1))

    def close(self) -> None:
        self.host.stop()
        self.redis.teardown()
        self.pg.teardown()
        if self.opts.keep:
            print(f"kept {self.root} (logs, data)", file=sys.stderr)
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    def ensure_up(self) -> None:
        """After a scenario that failed half way, the next one still gets both servers."""
        if not self.pg.running():
            self.pg.start()
        if self.redis.popen is None or self.redis.popen.poll() is not None:
            self.redis.start()

    def deployment(self, name: str) -> Deployment:
        return Deployment(name, self.root / name, self.pg, self.redis, self.host, self.opts.overrides)


# --- events ------------------------------------------------------------------------------------
def event_json(event: EventPlan, title: str = "fault suite listing") -> str:
    return json.dumps({
        "event_id": event.event_id, "type": "listing.created",
        "occurred_at": datetime.now(UTC).isoformat(),
        "listing": {"id": event.listing, "seller_id": "seller-faults", "title": title,
                    "category": None, "images": event.urls},
    })


def new_event(host: ImageHost, listing: str, images: int = 2, urls: list[str] | None = None) -> EventPlan:
    urls = urls if urls is not None else [host.image(f"{listing}-{i}") for i in range(images)]
    return EventPlan(event_id=str(uuid.uuid4()), listing=listing, urls=urls)


def send(d: Deployment, event: EventPlan, times: int = 1, title: str = "fault suite listing") -> None:
    client = d.redis_server.client()
    try:
        for _ in range(times):
            event.entry_ids.append(text(client.xadd(STREAM, {"event": event_json(event, title)})))
    finally:
        client.close()


def send_raw(d: Deployment, payload: str) -> str:
    client = d.redis_server.client()
    try:
        return text(client.xadd(STREAM, {"event": payload}))
    finally:
        client.close()


def start_all(d: Deployment, workers: int) -> None:
    d.upgrade()
    for _ in range(workers):
        d.start_worker()
    d.start_ingest()
    d.start_beat()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, d: Deployment) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        d.supervise()
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


def in_flight(d: Deployment) -> int:
    """Images a worker has started (an attempt is counted) but not finished."""
    conn = psycopg2.connect(d.pg.dsn(d.database))
    try:
        with conn.cursor() as cur:
            return scalar(cur, "SELECT count(*) FROM images WHERE status = 'pending' AND attempts > 0")
    finally:
        conn.close()


def busy(d: Deployment, hits: int = 3) -> Callable[[], bool]:
    start = d.host.total_hits()
    return lambda: d.host.total_hits() - start >= hits


# --- scenarios -----------------------------------------------------------------------------------
def worker_kill(suite: Suite, d: Deployment, opts: Options) -> Injection:
    start_all(d, opts.workers)
    plan = Plan(events=[new_event(suite.host, f"wk-{i}") for i in range(opts.listings)])
    probe = busy(d)
    for event in plan.events:
        send(d, event)
    wait_until(probe, 120, "the workers to fetch images", d)
    # The victim is the worker with the most downloads under way: it dies mid-task.
    fetching = suite.host.fetching()
    workers = [p for p in d.procs if p.name.startswith("worker") and p.alive()]
    victim = max(workers, key=lambda p: fetching.get(p.pgid, 0))
    started = in_flight(d)
    fault_at = time.monotonic()
    d.retire(victim)
    victim.kill()
    d.start_worker(wait=False)
    held = fetching.get(victim.pgid, 0)
    return Injection(plan, fault_at, f"SIGKILL to {victim.name}'s process group, a new worker started",
                     {"images_in_flight_at_kill": started, "downloads_in_killed_worker": held},
                     exercised=held > 0)


def redis_restart(suite: Suite, d: Deployment, opts: Options) -> Injection:
    start_all(d, opts.workers)
    plan = Plan(events=[new_event(suite.host, f"rr-{i}") for i in range(opts.listings)])
    half = len(plan.events) // 2
    probe = busy(d)
    for event in plan.events[:half]:
        send(d, event)
    wait_until(probe, 120, "the worker to fetch images", d)
    started = in_flight(d)
    fault_at = time.monotonic()
    suite.redis.stop()
    time.sleep(opts.redis_downtime)
    suite.redis.start()
    down = time.monotonic() - fault_at
    for event in plan.events[half:]:  # the producer retried while Redis was away
        send(d, event)
    return Injection(plan, fault_at, f"Redis stopped (SIGTERM, AOF on) for {opts.redis_downtime:.0f} s",
                     {"images_in_flight_at_stop": started}, fault_s=down)


def postgres_outage(suite: Suite, d: Deployment, opts: Options) -> Injection:
    start_all(d, opts.workers)
    plan = Plan(events=[new_event(suite.host, f"pg-{i}") for i in range(opts.listings)])
    half = len(plan.events) // 2
    probe = busy(d)
    for event in plan.events[:half]:
        send(d, event)
    wait_until(probe, 120, "the worker to fetch images", d)
    started = in_flight(d)
    fault_at = time.monotonic()
    suite.pg.stop("fast")
    for event in plan.events[half:]:  # events keep coming during the outage
        send(d, event)
        time.sleep(1.0)
    time.sleep(max(0.0, fault_at + opts.pg_outage - time.monotonic()))
    suite.pg.start()
    down = time.monotonic() - fault_at
    return Injection(plan, fault_at, f"Postgres down for {opts.pg_outage:.0f} s (pg_ctl stop -m fast), "
                     f"{len(plan.events) - half} events sent meanwhile", {"images_in_flight_at_stop": started},
                     fault_s=down)


def ingest_kill(suite: Suite, d: Deployment, opts: Options) -> Injection:
    d.upgrade()
    for _ in range(opts.workers):
        d.start_worker()
    d.start_beat()
    count = 100 if opts.quick else 300
    plan = Plan(events=[new_event(suite.host, f"ik-{i}", urls=[suite.host.image(f"ik-{i}", latency=0)])
                        for i in range(count)])
    for event in plan.events:
        send(d, event)
    client = d.redis_server.client()
    try:
        ingest = d.start_ingest(wait=False)
        deadline, fault_at = time.monotonic() + 120, None
        while time.monotonic() < deadline and ingest.alive():
            # Kill while the consumer holds entries it read but has not acknowledged yet, and
            # after it has queued some work (so the kill is "mid-run").
            if client.llen("ingest") > 0 and client.xpending(STREAM, GROUP)["pending"] > 0:
                fault_at = time.monotonic()
                d.retire(ingest)
                ingest.kill()
                break
            time.sleep(0.005)
        if fault_at is None:
            raise RuntimeError("ingest never held unacknowledged entries to kill it on")
        pending = client.xpending(STREAM, GROUP)["pending"]
        read = client.xinfo_groups(STREAM)[0].get("entries-read")
    finally:
        client.close()
    d.start_ingest(wait=False)
    return Injection(plan, fault_at, "SIGKILL to `catalog ingest` holding unacknowledged entries, a new one started",
                     {"entries_pending_at_kill": pending, "entries_read_before_kill": read},
                     exercised=pending > 0)


def duplicates(suite: Suite, d: Deployment, opts: Options) -> Injection:
    start_all(d, opts.workers)
    plan = Plan(events=[new_event(suite.host, f"dup-{i}") for i in range(opts.listings)])
    fault_at = time.monotonic()
    for event in plan.events:
        send(d, event, times=4)
    return Injection(plan, fault_at, "each event XADDed 4 times back to back (same event_id)")


def poison(suite: Suite, d: Deployment, opts: Options) -> Injection:
    start_all(d, opts.workers)
    host = suite.host
    plan = Plan()
    crash, hang = host.crashing("p"), host.hanging("p")
    plan.poison = {crash, hang}
    before = new_event(host, "po-before")
    with_crash = new_event(host, "po-crash", urls=[host.image("po-c1"), crash, host.image("po-c2")])
    with_hang = new_event(host, "po-hang", urls=[hang, host.image("po-h1")])
    after = [new_event(host, f"po-after-{i}") for i in range(1 if opts.quick else 3)]
    fault_at = time.monotonic()
    for event in (before, with_crash, with_hang):
        send(d, event)
    nul = new_event(host, "po-nul", urls=[])
    malformed = [
        ("not JSON", "{this is not json", None),
        ("missing fields", json.dumps({"type": "listing.created"}), None),
        ("nested 100000 deep", "[" * 100_000 + "]" * 100_000, None),
        ("NUL in title", event_json(nul, title="bad\x00title"), nul.listing),
    ]
    for label, payload, accepted in malformed:
        plan.malformed.append(MalformedPlan(label, send_raw(d, payload), accepted))
    for event in after:
        send(d, event)
    plan.events = [before, with_crash, with_hang, *after]
    return Injection(plan, fault_at, "an image that SIGKILLs the worker fetching it, one whose host drips its "
                     "headers at 1 byte/s, then 4 malformed entries ahead of valid events")


SCENARIOS: dict[str, Callable[[Suite, Deployment, Options], Injection]] = {
    "worker_kill": worker_kill, "redis_restart": redis_restart, "postgres_outage": postgres_outage,
    "ingest_kill": ingest_kill, "duplicates": duplicates, "poison": poison,
}


# --- running and reporting ----------------------------------------------------------------------------
def run_scenario(suite: Suite, name: str) -> dict[str, Any]:
    opts = suite.opts
    began = time.monotonic()
    hits_before, kills_before = suite.host.total_hits(), len(suite.host.crash_kills)
    d = suite.deployment(name)
    result: dict[str, Any] = {"scenario": name}
    try:
        injection = SCENARIOS[name](suite, d, opts)
        result.update(fault=injection.fault, exercised=injection.exercised, fault_s=round(injection.fault_s, 1),
                      **injection.notes)
        dsn = d.pg.dsn(d.database)
        deadline, recovery = injection.fault_at + opts.window, None
        while time.monotonic() < deadline:
            if listings_done(dsn, injection.plan):
                recovery = time.monotonic() - injection.fault_at
                break
            d.supervise()
            time.sleep(0.5)
        if recovery is not None:
            time.sleep(opts.settle)
        client = d.redis_server.client()
        try:
            stream = stream_state(client, STREAM, GROUP, DEAD)
        finally:
            client.close()
        result.update(measure(dsn, injection.plan, stream))
        result["recovery_s"] = None if recovery is None else round(recovery, 1)
        status = d.catalog("status", "--json", timeout=60)
        result["catalog_status"] = json.loads(status.stdout) if status.returncode == 0 else status.stderr[-2000:]
    except Exception as exc:  # noqa: BLE001 - a harness or setup failure is a result too, never a silent pass
        result["error"] = f"{type(exc).__name__}: {exc}"[:3000]
    finally:
        d.stop_all()
        with contextlib.suppress(Exception):
            suite.ensure_up()
    result["image_fetches"] = suite.host.total_hits() - hits_before
    result["crash_kills"] = len(suite.host.crash_kills) - kills_before
    result["unexpected_exits"] = d.exits
    result["evidence"] = evidence(d.logs())
    result["logs"] = str(d.dir) if opts.keep else None
    result["seconds"] = round(time.monotonic() - began, 1)
    result["passed"] = passed(result, opts.max_recovery)
    return result


def run_suite(names: list[str], opts: Options, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    missing = missing_tools()
    if missing:
        raise RuntimeError("cannot run the fault suite: missing " + ", ".join(missing))
    results = []
    with Suite(opts) as suite:
        for name in names:
            log(f"--- {name} ...")
            result = run_scenario(suite, name)
            log(f"    {'pass' if result['passed'] else 'FAIL'} in {result['seconds']:.0f} s")
            results.append(result)
    return results


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    # SIGTERM unwinds like Ctrl-C, so the servers and processes are torn down either way.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS), help="repeatable; default all")
    parser.add_argument("--quick", action="store_true", help="fewer events per scenario")
    parser.add_argument("--json", type=Path, help="write every figure (and log evidence) here")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument("--window", type=float, default=Options.window, help="seconds after the fault")
    parser.add_argument("--max-recovery", type=float, default=Options.max_recovery)
    parser.add_argument("--pg-outage", type=float, default=Options.pg_outage)
    parser.add_argument("--workers", type=int, default=Options.workers, help="`catalog worker -c 2` processes")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a CATALOG_* setting for every process (CATALOG_ prefix optional)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory with all logs")
    args = parser.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.set)
    opts = Options(quick=args.quick, window=args.window, max_recovery=args.max_recovery,
                   pg_outage=args.pg_outage, workers=args.workers, overrides=overrides, keep=args.keep)
    names = args.scenario or list(SCENARIOS)
    started = datetime.now(UTC)
    with _sigterm_as_exit():
        results = run_suite(names, opts)
    print()
    print(table(results, opts.window))
    print()
    for result in results:
        print(notes(result))
    if args.markdown:
        print()
        print(table(results, opts.window, markdown=True))
    if args.json:
        meta = {"started": started.isoformat(), "revision": git_revision(ROOT), "quick": opts.quick,
                "window_s": opts.window, "max_recovery_s": opts.max_recovery, "workers": opts.workers,
                "overrides": overrides, "cores": os.cpu_count(), "python": platform.python_version()}
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
