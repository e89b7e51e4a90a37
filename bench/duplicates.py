"""Duplicate-photo bench: accuracy per transformation and index lookup latency.

    python -m bench.duplicates                     # scratch Postgres DB on 127.0.0.1, all parts
    python -m bench.duplicates --skip-latency      # accuracy only
    python -m bench.duplicates --no-embedding      # hashes only (no EfficientNet re-check)
    python -m bench.duplicates --sizes 10000,100000
    python -m bench.duplicates --skip-latency --stored-tree /tmp/before   # hashes of another version

``--stored-tree`` registers the originals and distractors with the hashes that another checkout
(e.g. a ``git worktree`` of the commit before a change of the hash values) computes, and
queries with this tree's: how an index built by the older version matches photos analysed by
the newer one, before the older images are analysed again.

Accuracy: originals are registered under seller A, distractors under other sellers, then a
transformed copy of every original is submitted under seller B (must be flagged, matching
its original), the same copies under seller A (must not be flagged: same seller), and
transformed copies of held-out negatives (never stored) under seller B (must not be flagged).

Latency: random 64-bit hashes (pHash and dHash of one view per stored image, four band rows
each) are bulk-loaded with COPY, and the real candidate lookup of one photo's query (its views,
its query-only crops and mirror image: 52 hashes, with and without one-bit neighbour probes) is timed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import statistics
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable

import numpy as np
from PIL import Image
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

import db.fraud_models  # noqa: F401  (registers image_hash_bands)
from bench.dupdata import TRANSFORMS, load_pool
from db import models as m
from worker.config import load_settings
from worker.fraud.duplicates import BANDS, DuplicatesStep
from worker.fraud.fingerprint import HashValue, fingerprint
from worker.pipeline.contract import ImageContext, StepResult
from worker.pipeline.duplicates import DuplicateIndex, DuplicatesWriter
from worker.pipeline.writers import WriteContext

ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"

def scratch_db(name: str) -> str:
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def drop_db(name: str) -> None:
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


class Catalog:
    """Just enough of the worker's persistence to register images and query them."""

    def __init__(self, session: Session, settings) -> None:
        self.s = session
        self.settings = settings
        self.step = DuplicatesStep()
        self.writer = DuplicatesWriter()
        self.n = 0

    def _rows(self, seller: str, img: Image.Image) -> tuple[m.Listing, m.Image, bytes]:
        self.n += 1
        buf = io.BytesIO()
        img.save(buf, "PNG")
        raw = buf.getvalue()
        listing = m.Listing(external_id=f"L{self.n}", seller_id=seller, title="", status="done")
        self.s.add(listing)
        self.s.flush()
        row = m.Image(listing_id=listing.id, url=f"https://img.example/{self.n}.png", status="done",
                      sha256=hashlib.sha256(raw).hexdigest())
        self.s.add(row)
        self.s.flush()
        return listing, row, raw

    def _ctx(self, listing: m.Listing, row: m.Image, raw: bytes, img: Image.Image,
             embedding: np.ndarray | None) -> ImageContext:
        ctx = ImageContext(image_id=row.id, listing_id=listing.id, seller_id=listing.seller_id,
                           category=None, url=row.url, image=img, raw=raw, source_format="PNG",
                           sha256=row.sha256 or "", settings=self.settings)
        if embedding is not None:
            ctx.results["tagging"] = StepResult(embedding=embedding)
        return ctx

    def register(self, seller: str, img: Image.Image, embedding: np.ndarray | None,
                 hashes: list[HashValue] | None = None) -> int:
        listing, row, raw = self._rows(seller, img)
        DuplicateIndex.store(self.s, row.id, fingerprint(img) if hashes is None else hashes)
        if embedding is not None:
            self.s.add(m.Embedding(image_id=row.id, model_version="bench", dim=embedding.size,
                                   vector=embedding.astype("<f4").tobytes()))
        self.s.flush()
        return row.id

    def query(self, seller: str, img: Image.Image, embedding: np.ndarray | None) -> tuple[StepResult, float]:
        """Run the step and its writer (the search) on a new upload, then forget it (each
        query is independent)."""
        sp = self.s.begin_nested()
        listing, row, raw = self._rows(seller, img)
        started = time.perf_counter()
        result = self.step.run(self._ctx(listing, row, raw, img, embedding))
        wctx = WriteContext(session=self.s, image_id=row.id, listing_id=listing.id,
                            seller_id=listing.seller_id, settings=self.settings)
        result = self.writer.write(wctx, result)
        elapsed = (time.perf_counter() - started) * 1000
        sp.rollback()
        return result, elapsed


_STORED_HASHES = """
import io, json, sys
from PIL import Image
from worker.fraud.fingerprint import fingerprint
out = []
for raw in json.load(sys.stdin):
    img = Image.open(io.BytesIO(bytes.fromhex(raw))).convert("RGB")
    out.append([[h.kind, h.view, h.mirrored, h.value] for h in fingerprint(img)])
json.dump(out, sys.stdout)
"""


def hashes_of_tree(tree: str, images: list[Image.Image]) -> list[list[HashValue]]:
    """The stored fingerprints of ``images`` as the checkout at ``tree`` computes them."""
    payload = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, "PNG")
        payload.append(buf.getvalue().hex())
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
    done = subprocess.run([sys.executable, "-c", _STORED_HASHES], input=json.dumps(payload), env=env,
                          capture_output=True, text=True, check=True, cwd=os.path.abspath(tree))
    return [[HashValue(k, v, bool(mm), int(x)) for k, v, mm, x in rows] for rows in json.loads(done.stdout)]


def accuracy(url: str, use_embedding: bool, stored_tree: str | None = None) -> dict:
    settings = load_settings()
    pool = load_pool()
    random.Random(5).shuffle(pool)
    originals, distractors, negatives = pool[:40], pool[40:52], pool[52:]
    stored: list[list[HashValue] | None] = [None] * (len(originals) + len(distractors))
    if stored_tree is not None:
        stored = list(hashes_of_tree(stored_tree, [img for _, img in originals + distractors]))
    embed: Callable[[Image.Image], np.ndarray] | None = None
    embed_many: Callable[[list[Image.Image]], list[np.ndarray]] | None = None
    if use_embedding:
        from bench.embed import Embedder
        embedder = Embedder()

        def _embed(img: Image.Image) -> np.ndarray:
            return embedder([img])[0]

        def _embed_many(imgs: list[Image.Image]) -> list[np.ndarray]:
            return [v for i in range(0, len(imgs), 16) for v in embedder(imgs[i:i + 16])]

        embed, embed_many = _embed, _embed_many

    engine = create_engine(url)
    m.Base.metadata.create_all(engine)
    rnd = random.Random(11)
    results: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    timings = []
    with Session(engine) as s:
        cat = Catalog(s, settings)
        orig_ids = {}
        for (name, img), hashes in zip(originals, stored, strict=False):
            orig_ids[name] = cat.register("seller-A", img, embed(img) if embed is not None else None, hashes)
        for i, ((_name, img), hashes) in enumerate(zip(distractors, stored[len(originals):], strict=True)):
            cat.register(f"seller-C{i}", img, embed(img) if embed is not None else None, hashes)
        s.commit()
        for tname, tf in TRANSFORMS.items():
            r = results[tname]
            copies = [tf(img, rnd) for _, img in originals]
            neg_copies = [tf(img, rnd) for _, img in negatives]
            vecs: list[np.ndarray | None] = list(embed_many(copies)) if embed_many is not None else [None] * len(copies)
            neg_vecs: list[np.ndarray | None] = (list(embed_many(neg_copies)) if embed_many is not None
                                                 else [None] * len(neg_copies))
            for (name, _img), copy, vec in zip(originals, copies, vecs, strict=True):
                res, ms = cat.query("seller-B", copy, vec)
                timings.append(ms)
                flags = [f for f in res.flags if f.kind == "duplicate_image"]
                r["positives"] += 1
                if flags:
                    matched = {mm["matched_image_id"] for mm in flags[0].evidence["matches"]}
                    if orig_ids[name] in matched:
                        r["tp"] += 1
                    else:
                        r["fp"] += 1
                        print(f"  wrong match {tname} {name}: {flags[0].evidence['summary']}", file=sys.stderr)
                same, _ = cat.query("seller-A", copy, vec)
                r["same_seller_flags"] += int(any(f.kind == "duplicate_image" for f in same.flags))
            for (name, _img), copy, vec in zip(negatives, neg_copies, neg_vecs, strict=True):
                res, ms = cat.query("seller-B", copy, vec)
                timings.append(ms)
                r["negatives"] += 1
                if any(f.kind == "duplicate_image" for f in res.flags):
                    r["fp"] += 1
                    print(f"  false flag {tname} {name}: {res.flags[0].evidence['summary']}", file=sys.stderr)
    engine.dispose()
    return {"per_transform": results, "step_ms_median": statistics.median(timings),
            "originals": len(originals), "distractors": len(distractors), "negatives": len(negatives)}


def print_accuracy(acc: dict, label: str) -> list[str]:
    lines = [f"### {label}",
             f"{acc['originals']} originals (seller A), {acc['distractors']} distractors (other sellers), "
             f"{acc['negatives']} held-out negatives per transformation; step median "
             f"{acc['step_ms_median']:.0f} ms per image on Postgres (search + hashing).", "",
             "| transformation | recall | precision | false flags | same-seller flags |",
             "|---|---|---|---|---|"]
    totals: defaultdict[str, int] = defaultdict(int)
    for tname, r in acc["per_transform"].items():
        rec = r["tp"] / r["positives"]
        flagged = r["tp"] + r["fp"]
        prec = r["tp"] / flagged if flagged else 1.0
        lines.append(f"| {tname} | {rec:.3f} | {prec:.3f} | {r['fp']} | {r['same_seller_flags']} |")
        for k, v in r.items():
            totals[k] += v
    flagged = totals["tp"] + totals["fp"]
    lines.append(f"| **overall** | **{totals['tp'] / totals['positives']:.3f}** | "
                 f"**{(totals['tp'] / flagged if flagged else 1):.3f}** | {totals['fp']} | "
                 f"{totals['same_seller_flags']} |")
    print("\n".join(lines), flush=True)
    return lines


# --- latency ---------------------------------------------------------------------------


def _copy_random(conn, start: int, count: int, rng: np.random.Generator) -> None:
    raw = conn.connection.dbapi_connection
    cur = raw.cursor()
    chunk = 250_000
    for lo in range(start, start + count, chunk):
        n = min(chunk, start + count - lo)
        ids = np.arange(lo, lo + n, dtype=np.int64)
        lines = []
        for kind in ("phash", "dhash"):
            values = rng.integers(0, 2**64, size=n, dtype=np.uint64)
            signed = values.view(np.int64)
            for b in range(BANDS):
                bands = (values >> np.uint64(64 - 16 * (b + 1))) & np.uint64(0xFFFF)
                lines.append(np.char.add(np.char.add(np.char.add(
                    ids.astype(str), f"\tfull\t{kind}\t{b}\t"), bands.astype(str)),
                    np.char.add("\t", signed.astype(str))))
        buf = io.StringIO("\n".join("\n".join(part) for part in lines) + "\n")
        cur.copy_expert("COPY image_hash_bands (image_id, view, hash_kind, band_no, band_value, hash_value) "
                        "FROM STDIN", buf)
    raw.commit()


def latency(url: str, sizes: list[int]) -> list[str]:
    engine = create_engine(url)
    m.Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE image_hash_bands DROP CONSTRAINT IF EXISTS fk_image_hash_bands_image_id_images"))
        conn.execute(text("TRUNCATE image_hash_bands"))
    rng = np.random.default_rng(7)
    pool = load_pool()
    queries = [fingerprint(img, query=True)
               for _, img in pool[:30]]
    lines = ["| stored hashes per kind | band rows | lookup median, exact bands (ms) | p95 | "
             "lookup median, +1-bit probes (ms) | p95 | candidates (probes) |", "|---|---|---|---|---|---|---|"]
    loaded = 0
    for size in sizes:
        with engine.connect() as conn:
            if size - loaded > 200_000:
                conn.execute(text("DROP INDEX IF EXISTS ix_image_hash_bands_lookup"))
                conn.commit()
            t0 = time.perf_counter()
            _copy_random(conn, loaded + 1, size - loaded, rng)
            conn.execute(text("CREATE INDEX IF NOT EXISTS ix_image_hash_bands_lookup ON image_hash_bands "
                              "(hash_kind, band_no, band_value, image_id)"))
            conn.execute(text("ANALYZE image_hash_bands"))
            conn.commit()
            load_s = time.perf_counter() - t0
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM image_hash_bands"))  # visibility map: index-only scans
        loaded = size
        row = [f"{size:,}", f"{size * 8:,}"]
        cand_count = 0
        for neighbours in (False, True):
            times = []
            with Session(engine) as s:
                for rep in range(2):
                    for q in queries:
                        t = time.perf_counter()
                        ids = DuplicateIndex.candidates(s, q, exclude_image_id=None, neighbours=neighbours,
                                                        limit=200)
                        DuplicateIndex.load(s, ids)
                        if rep == 1:
                            times.append((time.perf_counter() - t) * 1000)
                        if neighbours:
                            cand_count = max(cand_count, len(ids))
            row += [f"{statistics.median(times):.1f}", f"{np.percentile(times, 95):.1f}"]
        row.append(f"≤{cand_count}")
        lines.append("| " + " | ".join(row) + " |")
        print(lines[-1], f"(load {load_s:.0f} s)", flush=True)
    engine.dispose()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--no-embedding", action="store_true", help="skip the run with embedding re-check")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--stored-tree", default=None, metavar="PATH",
                        help="register the originals and distractors with the hashes of the checkout at PATH")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    name = f"fraud_bench_{os.getpid()}"
    url = scratch_db(name)
    started = time.perf_counter()
    try:
        if not args.skip_accuracy:
            print_accuracy(accuracy(url, use_embedding=False, stored_tree=args.stored_tree),
                           "Hashes only (no embedding)")
            if not args.no_embedding:
                with create_engine(url).begin() as conn:
                    m.Base.metadata.drop_all(conn)
                print_accuracy(accuracy(url, use_embedding=True, stored_tree=args.stored_tree),
                               "Hashes + EfficientNet-Lite0 cosine re-check")
        if not args.skip_latency:
            latency(url, [int(x) for x in args.sizes.split(",")])
    finally:
        drop_db(name)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
