"""Pipeline throughput and latency (the foundation, without the vision models).

``python -m bench`` (bench/__main__.py) supersedes this script with every figure of issue 14;
this one stays for the earlier figures of docs/benchmarks.md. Both use Redis database 12 and
the same lock, so they never run against each other.

    python -m bench.pipeline                  # ~1-2 min on 2 cores; needs local Postgres + Redis
    python -m bench.pipeline --images 200 --steps metadata

Measured in one run, on real photos written from scikit-image's sample data:

1. In-process latency per image (`catalog process` path: fetch + decode + steps + one write
   transaction), SQLite (the baseline) vs Postgres.
2. Production wiring throughput: events XADDed to Redis, `catalog ingest`, and `catalog worker`
   processes on the Redis broker writing to Postgres; images/s with 1 worker process (the
   baseline) vs 2, end to end from the first XADD to the last listing `done`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg2
import redis
from PIL import Image

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
PG_BASE = "postgresql+psycopg2://postgres@127.0.0.1:5432"
REDIS_URL = "redis://127.0.0.1:6379/12"


def write_photos(folder: Path, n: int) -> list[str]:
    from skimage import data

    bases = [Image.fromarray(getattr(data, name)()).convert("RGB")
             for name in ("coffee", "chelsea", "astronaut", "rocket")]
    out = []
    for i in range(n):
        img = bases[i % len(bases)]
        w, h = img.size
        crop = img.crop((i % 37, i % 23, w - (i % 29), h - (i % 31)))  # distinct bytes per file
        path = folder / f"p{i:04d}.jpg"
        crop.save(path, quality=90)
        out.append(str(path))
    return out


def admin(sql: str) -> None:
    conn = psycopg2.connect(PG_ADMIN)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql)
    conn.close()


def in_process_latency(url: str, photos: list[str], steps: list[str], data_dir: Path) -> list[float]:
    from db.migrate import upgrade
    from db.session import session_factory
    from worker.config import load_settings
    from worker.intake.events import parse_event
    from worker.pipeline.analyze import analyze_image
    from worker.pipeline.events import apply_event

    upgrade(url)
    # the photos are local files: the worker reads them only from an allowed directory
    settings = load_settings(data_dir=data_dir, database_url=url, steps=steps,
                             fetch_allow_dirs=[str(Path(photos[0]).parent)])
    factory = session_factory(url)
    ids: list[int] = []
    for n in range(0, len(photos), 10):
        event = parse_event({"event_id": str(uuid.uuid4()), "type": "listing.created",
                             "occurred_at": datetime.now(UTC).isoformat(),
                             "listing": {"id": f"bench-{n}", "seller_id": "s", "images": photos[n:n + 10]}})
        with factory() as s, s.begin():
            ids += apply_event(s, event).images_to_analyze
    times = []
    for image_id in ids:
        start = time.perf_counter()
        with factory() as s:
            analyze_image(s, image_id, settings)
        times.append((time.perf_counter() - start) * 1000)
    return times[1:]  # the first image pays for loading the models


def end_to_end(photos: list[str], per_listing: int, concurrency: int, steps: list[str], tmp: Path) -> float:
    """Seconds from the first XADD to the last listing done."""
    from db.migrate import upgrade

    name = f"catalog_bench_{os.getpid()}_{concurrency}"
    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin(f'CREATE DATABASE "{name}"')
    url = f"{PG_BASE}/{name}"
    upgrade(url)
    r = redis.Redis.from_url(REDIS_URL)
    _take_redis(r)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CATALOG_")}
    env.update(CATALOG_DATABASE_URL=url, CATALOG_BROKER_URL=REDIS_URL, CATALOG_DATA_DIR=str(tmp / "data"),
               CATALOG_STEPS=",".join(steps), CATALOG_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1",
               CATALOG_FETCH_ALLOW_DIRS=str(Path(photos[0]).parent),
               # cores / processes intra-op threads each: oversubscribed OpenMP is many times slower
               CATALOG_TORCH_THREADS=str(max(1, (os.cpu_count() or 1) // concurrency)))
    cmd = [sys.executable, "-m", "worker.cli"]
    procs = [subprocess.Popen([*cmd, "worker", "--concurrency", str(concurrency)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen([*cmd, "ingest"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    time.sleep(4)  # let both start: we time the work, not the process start-up
    warm = r.xadd  # one throw-away listing per pool process loads the models before timing
    for n in range(concurrency):
        warm("catalog:events", {"event": json.dumps({
            "event_id": str(uuid.uuid4()), "type": "listing.created",
            "occurred_at": datetime.now(UTC).isoformat(),
            "listing": {"id": f"warm{n}", "seller_id": "w", "images": [photos[n]]}})})
    _wait_done(name, concurrency)
    listings = [photos[i:i + per_listing] for i in range(0, len(photos), per_listing)]
    start = time.perf_counter()
    for n, refs in enumerate(listings):
        r.xadd("catalog:events", {"event": json.dumps({
            "event_id": str(uuid.uuid4()), "type": "listing.created",
            "occurred_at": datetime.now(UTC).isoformat(),
            "listing": {"id": f"L{n}", "seller_id": "s", "images": refs}})})
    try:
        _wait_done(name, concurrency + len(listings))
        return time.perf_counter() - start
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        r.flushdb()
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _take_redis(r: redis.Redis) -> None:
    """Flush the bench's Redis database for this run, unless another live bench holds it
    (`python -m bench` uses the same database and lock: two runs would share one broker)."""
    from bench.common import LOCK_KEY, _pid_alive

    owner = r.get(LOCK_KEY)
    if owner is not None and int(owner) != os.getpid() and _pid_alive(int(owner)):
        raise RuntimeError(f"Redis {REDIS_URL} is in use by bench process {int(owner)}; wait for it to finish")
    r.flushdb()
    r.set(LOCK_KEY, os.getpid())


def _wait_done(dbname: str, expected: int, timeout: float = 900) -> None:
    conn = psycopg2.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={dbname}")
    conn.autocommit = True
    deadline = time.perf_counter() + timeout
    try:
        while True:
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM listings WHERE status = 'done'")
                row = cur.fetchone()
                if row is not None and row[0] >= expected:
                    return
            if time.perf_counter() > deadline:
                raise RuntimeError("timed out waiting for listings")
            time.sleep(0.05)
    finally:
        conn.close()


def summary(times: list[float]) -> str:
    q = statistics.quantiles(times, n=20)
    return f"median {statistics.median(times):6.1f} ms  p95 {q[18]:6.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--per-listing", type=int, default=4)
    parser.add_argument("--steps", default="metadata")
    args = parser.parse_args()
    steps = [s for s in args.steps.split(",") if s]
    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        (tmp / "photos").mkdir()
        photos = write_photos(tmp / "photos", args.images)
        print(f"{len(photos)} photos, steps: {', '.join(steps)}, {os.cpu_count()} CPU cores\n")
        print("1. in-process latency per image (fetch, decode, steps, write)")
        sqlite = in_process_latency(f"sqlite:///{tmp / 'bench.db'}", photos, steps, tmp / "d1")
        pg_name = f"catalog_bench_lat_{os.getpid()}"
        admin(f'CREATE DATABASE "{pg_name}"')
        try:
            pg = in_process_latency(f"{PG_BASE}/{pg_name}", photos, steps, tmp / "d2")
        finally:
            from db.session import dispose_engines

            dispose_engines()
            admin(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')
        print(f"   SQLite   (baseline) {summary(sqlite)}")
        print(f"   Postgres            {summary(pg)}   ratio {statistics.median(pg) / statistics.median(sqlite):.2f}x")

        print("\n2. end to end: XADD -> ingest -> Redis broker -> worker -> Postgres")
        results = {}
        for conc in (1, 2):
            secs = end_to_end(photos, args.per_listing, conc, steps, tmp)
            results[conc] = len(photos) / secs
            base = f"   {results[conc] / results[1]:.2f}x vs 1" if conc > 1 else "   (baseline)"
            print(f"   worker --concurrency {conc}: {results[conc]:6.1f} images/s ({secs:.1f} s){base}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
