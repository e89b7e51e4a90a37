"""A worker killed in the middle of an analysis, with real processes (issue 12, item 8): the
image is analysed again within seconds of its lease running out, by the next worker's own
sweeper, with no beat process and no help from the broker.

The embedded filesystem broker is the hard case: it forgets a message once a worker took
it, so before leases such an image stayed pending until the stale sweep of a beat process
(15 minutes), and never without one. Postgres, because that is where leases matter most.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psycopg2

from db.migrate import upgrade
from tests.support.http import LocalImageServer
from tests.support.images import write_photo
from tests.support.pipeline import event
from tests.support.procs import Proc, catalog_env, run_catalog, wait_for
from tests.support.services import PG_URL_BASE, create_pg_database, drop_pg_database, unique

LEASE_SECONDS = 10
SWEEP_SECONDS = 1


def _row(dsn: str, external_id: str) -> tuple | None:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("""SELECT i.status, i.attempts, i.lease_owner IS NOT NULL, i.error, i.width
                           FROM images i JOIN listings l ON l.id = i.listing_id WHERE l.external_id = %s""",
                        (external_id,))
            return cur.fetchone()
    finally:
        conn.close()


def test_a_killed_workers_image_is_recovered_by_the_next_workers_sweeper(tmp_path: Path) -> None:
    name = create_pg_database("catalog_recovery")
    dsn = f"host=127.0.0.1 port=5432 user=postgres dbname={name}"
    procs: list[Proc] = []
    server = LocalImageServer(tmp_path).start()
    try:
        upgrade(f"{PG_URL_BASE}/{name}")
        body = write_photo(tmp_path / "slow.jpg", size=(320, 240), seed=7).read_bytes()
        stall = server.stall("/slow.jpg", seconds=120, body=body, content_type="image/jpeg")
        env = catalog_env(database_url=f"{PG_URL_BASE}/{name}", data_dir=str(tmp_path / "data"),
                          fetch_allow_hosts=server.allow_entry, steps="metadata", device="cpu",
                          fetch_retries="0", fetch_read_timeout="150", fetch_total_timeout="200",
                          lease_seconds=str(LEASE_SECONDS), lease_sweep_seconds=str(SWEEP_SECONDS))
        listing = unique("L-kill")
        (tmp_path / "events.jsonl").write_text(json.dumps(event(listing, [server.url("/slow.jpg")])) + "\n")

        first = Proc(["worker", "--no-beat", "--concurrency", "1"], env, tmp_path / "worker1.log")
        procs.append(first)
        submitted = run_catalog(["submit", str(tmp_path / "events.jsonl")], env)
        assert submitted.returncode == 0, submitted.stderr
        assert stall.arrived.wait(120), first.output()[-3000:]  # in the middle of its download
        row = _row(dsn, listing)
        assert row is not None and row[:3] == ("pending", 1, True)  # claimed, leased
        first.kill()  # SIGKILL: parent and pool child, no chance to clean up
        killed_at = time.monotonic()
        stall.release()

        second = Proc(["worker", "--no-beat", "--concurrency", "1"], env, tmp_path / "worker2.log")
        procs.append(second)
        wait_for(lambda: (_row(dsn, listing) or ("",))[0] == "done", 90, "the image analysed again", [second])
        recovered_after = time.monotonic() - killed_at
        final = _row(dsn, listing)
    finally:
        for proc in procs:
            proc.stop()
        server.stop()
        drop_pg_database(name)
    # Two runs started (the killed one counts), no error, no lease left, the photo stored.
    assert final == ("done", 2, False, None, 320)
    assert recovered_after < LEASE_SECONDS + SWEEP_SECONDS + 45, recovered_after  # worker start-up included
    log = second.output()
    assert "re-queued 1 image(s) whose run stopped renewing its lease" in log, log[-3000:]
    assert stall.hits == 2
