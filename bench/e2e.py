"""The production-wiring parts: ``e2e`` (throughput), ``latency`` (XADD -> rows committed) and
``memory`` (worker RSS over 1,000 listings).

Each measurement starts its own scratch Postgres database, flushes the bench's Redis database
(:data:`bench.common.REDIS_URL`), and runs the real processes: ``catalog ingest`` and
``catalog worker`` (through :mod:`bench.workerhook`, which only adds the forward meter). Photos
are local files under ``CATALOG_FETCH_ALLOW_DIRS``, so the network is not measured. One
throw-away listing per pool process loads the models before anything is timed.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import common
from bench.common import bench_redis, pct, scratch_database, utc_timestamp

STREAM = "catalog:events"


@dataclass
class Cluster:
    """``catalog ingest`` + ``catalog worker`` on a scratch database and the bench's Redis."""

    url: str
    dbname: str
    redis: Any
    worker: subprocess.Popen[bytes]
    ingest: subprocess.Popen[bytes]
    stats_dir: Path
    photos: list[str]
    sent: int = 0
    listings: dict[str, float] = field(default_factory=dict)  # external id -> XADD time

    def send(self, images: list[str], listing_id: str | None = None) -> str:
        listing_id = listing_id or f"L{self.sent}-{uuid.uuid4().hex[:6]}"
        now = time.time()
        self.redis.xadd(STREAM, {"event": json.dumps({
            "event_id": str(uuid.uuid4()), "type": "listing.created",
            "occurred_at": datetime.now(UTC).isoformat(),
            "listing": {"id": listing_id, "seller_id": f"seller{self.sent % 7}", "images": images}})})
        self.listings[listing_id] = now
        self.sent += 1
        return listing_id

    def done_count(self) -> int:
        return int(self._query("SELECT count(*) FROM listings WHERE status = 'done'")[0][0])

    def wait_done(self, expected: int, timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while self.done_count() < expected:
            for proc, name in ((self.worker, "worker"), (self.ingest, "ingest")):
                if proc.poll() is not None:
                    raise RuntimeError(f"catalog {name} exited with {proc.returncode} (log: {self.stats_dir})")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"timed out: {self.done_count()} of {expected} listings done")
            time.sleep(0.05)

    def committed(self) -> dict[str, float]:
        """external id -> when its listing was finished (the worker's clock, same host)."""
        rows = self._query("SELECT external_id, processed_at FROM listings WHERE status = 'done'")
        return {ext: utc_timestamp(at) for ext, at in rows if at is not None}

    def failed_images(self) -> int:
        return int(self._query("SELECT count(*) FROM images WHERE status = 'failed'")[0][0])

    def worker_stats(self) -> dict[str, float]:
        """Summed over the pool processes: tasks, process CPU s, forward wall/CPU s."""
        total = {"tasks": 0.0, "cpu_s": 0.0, "forward_wall_s": 0.0, "forward_cpu_s": 0.0}
        for path in self.stats_dir.glob("*.json"):
            data = json.loads(path.read_text())
            for key in total:
                total[key] += float(data[key])
        return total

    def pool_rss_mb(self) -> list[float]:
        """RSS of the worker's pool processes (the children; the parent when it has none)."""
        import psutil  # type: ignore[import-untyped]

        parent = psutil.Process(self.worker.pid)
        # `python -m bench.workerhook` is the Celery parent itself; prefork children below it
        procs = parent.children(recursive=True) or [parent]
        return [round(p.memory_info().rss / 2**20, 1) for p in procs]

    def _query(self, sql: str) -> list[tuple[Any, ...]]:
        import psycopg2

        conn = psycopg2.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={self.dbname}")
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()
        finally:
            conn.close()


@contextmanager
def cluster(photos: list[str], steps: list[str], processes: int, *, device: str = "cpu",
            pool: str = "prefork", batch: int | None = None, log_dir: Path | None = None,
            threads: int | None = None, extra_env: dict[str, str] | None = None) -> Iterator[Cluster]:
    """Start ingest + a worker with ``processes`` pool processes; warm every pool process."""
    with ExitStack() as stack:
        url = stack.enter_context(scratch_database("catalog_bench_e2e"))
        r = stack.enter_context(bench_redis())
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-e2e-")))
        stats_dir = work / "stats"
        stats_dir.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CATALOG_")}
        cores = os.cpu_count() or 1
        threads = threads or (cores if pool == "threads" else max(1, cores // processes))
        env.update(CATALOG_DATABASE_URL=url, CATALOG_BROKER_URL=common.REDIS_URL, CATALOG_DATA_DIR=str(work / "data"),
                   CATALOG_STEPS=",".join(steps), CATALOG_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1",
                   CATALOG_FETCH_ALLOW_DIRS=str(Path(photos[0]).parent), CATALOG_DEVICE=device,
                   CATALOG_TORCH_THREADS=str(threads), BENCH_STATS_DIR=str(stats_dir))
        if batch:
            env["CATALOG_BATCH_MAX_SIZE"] = str(batch)
        env.update(extra_env or {})
        logs = log_dir or work
        cmd = [sys.executable, "-m", "bench.workerhook"]
        root = Path(__file__).resolve().parents[1]
        worker_log = stack.enter_context(open(logs / f"worker-{processes}.log", "wb"))
        ingest_log = stack.enter_context(open(logs / f"ingest-{processes}.log", "wb"))
        worker = subprocess.Popen([*cmd, "worker", "--pool", pool, "--concurrency", str(processes),
                                   "--without-gossip", "--without-mingle"], env=env, cwd=root,
                                  stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
        ingest = subprocess.Popen([*cmd, "ingest"], env=env, cwd=root, stdout=ingest_log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        stack.callback(_stop, [worker, ingest])
        c = Cluster(url=url, dbname=url.rsplit("/", 1)[1], redis=r, worker=worker, ingest=ingest,
                    stats_dir=stats_dir, photos=photos)
        warm = processes if pool != "threads" else 1
        for n in range(warm * 2):  # two per process: prefork hands tasks out unevenly at first
            c.send([photos[n % len(photos)]], f"warm{n}")
        c.wait_done(warm * 2, timeout=600)
        yield c


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM (Celery's warm shutdown), then SIGKILL to the process group after 10 s: each
    process was started in its own session, so its pool children go with it."""
    import signal

    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def burst(c: Cluster, images: int, per_listing: int, timeout: float = 900) -> dict[str, Any]:
    """XADD ``images`` photos in listings of ``per_listing`` at once; seconds to the last done."""
    before_done = c.done_count()
    before = c.worker_stats()
    listings = [[c.photos[(c.sent + i) % len(c.photos)] for i in range(start, min(start + per_listing, images))]
                for start in range(0, images, per_listing)]
    started = time.perf_counter()
    for refs in listings:
        c.send(refs)
    c.wait_done(before_done + len(listings), timeout)
    seconds = time.perf_counter() - started
    after = c.worker_stats()
    delta = {k: after[k] - before[k] for k in after}
    return {"images": images, "listings": len(listings), "seconds": round(seconds, 2),
            "images_per_s": round(images / seconds, 2), "failed_images": c.failed_images(),
            "worker_cpu_ms_per_image": round(delta["cpu_s"] * 1000 / images, 1),
            "worker_forward_wall_ms_per_image": round(delta["forward_wall_s"] * 1000 / images, 1),
            "worker_forward_cpu_ms_per_image": round(delta["forward_cpu_s"] * 1000 / images, 1)}


# --------------------------------------------------------------------------- the parts


def e2e_part(ctx: Any) -> dict[str, Any]:
    """Metadata-only and all-steps bursts with 1 and 2 worker processes."""
    cores = os.cpu_count() or 1
    counts = {"metadata": ctx.n(quick=100, full=240), "all": ctx.n(quick=8, full=16)}
    per_listing = 4
    results: dict[str, dict[str, Any]] = {}
    figures: list[dict[str, Any]] = []
    photos = ctx.photos(64)
    for label, steps in (("metadata", ["metadata"]), ("all", ctx.steps)):
        for procs in sorted({1, min(2, cores)}):
            with cluster(photos, steps, procs, log_dir=ctx.tmp) as c:
                res = burst(c, counts[label], per_listing)
            res["processes"] = procs
            res["threads_per_process"] = max(1, cores // procs)
            res["per_process_images_per_s"] = round(res["images_per_s"] / procs, 2)
            forward = res["worker_forward_wall_ms_per_image"]
            # in-run model-only throughput: every pool process doing nothing but its forwards
            res["in_run_model_only_images_per_s"] = round(procs * 1000 / forward, 2) if forward else None
            results[f"{label}-{procs}"] = res
            if label == "metadata":
                figures.append({"name": f"e2e metadata-only, {procs} worker process(es)",
                                "value": res["per_process_images_per_s"], "unit": "img/s per process",
                                "target": ">= 100", "note": f"{res['images_per_s']} img/s total, "
                                f"{res['images']} images, worker CPU {res['worker_cpu_ms_per_image']} ms/img"})
            else:
                figures.append({"name": f"e2e all steps, {procs} worker process(es)", "value": res["images_per_s"],
                                "unit": "img/s", "note": f"{res['images']} images; forwards "
                                f"{forward} ms/img; worker CPU {res['worker_cpu_ms_per_image']} ms/img"})
                ceiling = ctx.model_only(procs)
                if ceiling:
                    figures.append({"name": f"e2e / model-only, all steps, {procs} process(es)",
                                    "value": round(res["images_per_s"] / ceiling, 3), "unit": "ratio",
                                    "target": ">= 0.9", "note": f"model-only {ceiling} img/s (models part, "
                                    "same run)"})
                if res["in_run_model_only_images_per_s"]:
                    figures.append({"name": f"e2e / in-worker forward time, {procs} process(es)",
                                    "value": round(res["images_per_s"] / res["in_run_model_only_images_per_s"], 3),
                                    "unit": "ratio", "note": "share of the pool processes' time inside forwards"})
            ctx.log(f"e2e {label} x{procs}: {res}")
    return {"figures": figures, "details": {"photos": ctx.photo_desc, "per_listing": per_listing, "runs": results,
                                            "all_steps": ctx.steps}}


def latency_part(ctx: Any) -> dict[str, Any]:
    """XADD -> listing done, p50/p95/p99, one worker process, metadata-only steps, at ~60 % of
    the saturation throughput measured first in the same cluster."""
    photos = ctx.photos(64)
    count = ctx.n(quick=80, full=200)
    with cluster(photos, ["metadata"], 1, log_dir=ctx.tmp) as c:
        sat = burst(c, ctx.n(quick=60, full=120), 1)  # one image per listing, as offered below
        rate = 0.6 * sat["images_per_s"]
        interval = 1.0 / rate
        ids = []
        start = time.perf_counter()
        for i in range(count):
            target = start + i * interval
            delay = target - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            ids.append(c.send([photos[i % len(photos)]]))
        offered = count / (time.perf_counter() - start)
        c.wait_done(c.sent, timeout=300)
        done = c.committed()
    lat = [(done[i] - c.listings[i]) * 1000 for i in ids if i in done]
    p = {q: round(pct(lat, q), 1) for q in (50, 95, 99)}
    figures = [{"name": f"latency XADD->done p{q}, metadata-only", "value": v, "unit": "ms",
                "note": f"{count} listings x 1 image at {offered:.1f}/s (60 % of {sat['images_per_s']}/s saturation)"}
               for q, v in p.items()]
    return {"figures": figures, "details": {"saturation": sat, "offered_per_s": round(offered, 2), "listings": count,
                                            "percentiles_ms": p, "max_ms": round(max(lat), 1), "steps": ["metadata"]}}


def memory_part(ctx: Any) -> dict[str, Any]:
    """Worker pool-process RSS at start (after warm-up), after 500 and after 1,000 listings of
    one image each, metadata-only steps (so 1,000 listings fit in the time budget)."""
    photos = ctx.photos(64)
    total = ctx.n(quick=1000, full=1000)
    with cluster(photos, ["metadata"], 1, log_dir=ctx.tmp) as c:
        rss = {"start": sum(c.pool_rss_mb())}
        for mark in (500, 1000):
            burst(c, total // 2, 1)
            rss[str(mark)] = sum(c.pool_rss_mb())
    growth = round((rss["1000"] - rss["start"]) / rss["start"] * 100, 1)
    figures = [{"name": "worker RSS start / 500 / 1,000 listings", "value": f"{rss['start']:.0f} / {rss['500']:.0f} / "
                f"{rss['1000']:.0f}", "unit": "MiB", "note": "metadata-only steps, 1 pool process"},
               {"name": "worker RSS growth over 1,000 listings", "value": growth, "unit": "%", "target": "< 10"}]
    return {"figures": figures, "details": {"rss_mb": rss, "listings": total, "steps": ["metadata"]}}


# --------------------------------------------------------------------------- alone


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.e2e``: one metadata-only (or ``--steps``) burst, printed as JSON.

    ``--profile DIR`` writes a cProfile of every pool process (``DIR/<pid>.prof``, cumulative
    since the process started, rewritten every 25 tasks and at shutdown) to show where the
    worker's CPU goes per image."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=main.__doc__)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--per-listing", type=int, default=4)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--steps", default="metadata")
    parser.add_argument("--megapixels", type=float, default=1.0)
    parser.add_argument("--profile", type=Path, metavar="DIR")
    parser.add_argument("--sample", type=Path, metavar="DIR",
                        help="a sampling CPU profile of every pool process (DIR/<pid>.samples.json): "
                        "shares as in an unprofiled run, unlike --profile's cProfile")
    parser.add_argument("--repeat", type=int, default=1, help="bursts in the same cluster (each reported)")
    parser.add_argument("--threads", type=int, help="CATALOG_TORCH_THREADS (default: cores / processes)")
    parser.add_argument("--images-per-task", type=int, help="CATALOG_IMAGES_PER_TASK (default: the setting's)")
    args = parser.parse_args(argv)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        os.environ["BENCH_PROFILE_DIR"] = str(args.profile.resolve())
    if args.sample:
        args.sample.mkdir(parents=True, exist_ok=True)
        os.environ["BENCH_SAMPLE_DIR"] = str(args.sample.resolve())
    with tempfile.TemporaryDirectory(prefix="bench-e2e-photos-") as tmp:
        photos = common.write_photos(Path(tmp) / "photos", 64, args.megapixels)
        steps = [s.strip() for s in args.steps.split(",") if s.strip()]
        extra = {"CATALOG_IMAGES_PER_TASK": str(args.images_per_task)} if args.images_per_task else {}
        with cluster(photos, steps, args.processes, threads=args.threads, extra_env=extra) as c:
            for _ in range(args.repeat):
                res = burst(c, args.images, args.per_listing)
                res.update(processes=args.processes, steps=steps, load1=common.load1(), threads=args.threads,
                           images_per_task=args.images_per_task,
                           per_process_images_per_s=round(res["images_per_s"] / args.processes, 2),
                           photos=common.photo_sizes(photos))
                print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
