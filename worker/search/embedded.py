"""The embedded backend: usearch HNSW indexes in files, for SQLite and Postgres without pgvector.

Files, under ``CATALOG_SEARCH_DIR`` (default ``<data_dir>/search``): ``index-<kind>.usearch``
(an HNSW graph over half-precision vectors, cosine, keyed by ``search_vectors.id``),
``index-<kind>.json`` (its watermark and dimension) and ``index.lock``.

**Consistency model.** The database is the truth; a file is a cache of it that any process
may load and any process may replace. No worker writes an index while it analyses or stores an
image: the store transaction only inserts ``search_vectors`` rows. The process that answers a
query keeps the index in memory and, before each query, *catches up* from the database:

* rows with an id above its watermark (less an overlap of :data:`OVERLAP` ids, because on
  Postgres a transaction that took a smaller id may commit after one that took a larger) that
  the index does not hold are added;
* every :data:`RECONCILE_SECONDS` it compares all ids of the kind with the database (adds what
  is missing whatever its id, drops what is gone);
* every hit is checked against the database before it is returned (row still there, image
  ``done``, listing not ``deleted``, the filters): a deleted listing or a failed image is
  never returned even before the index forgets it, and hits whose rows are gone are removed
  from the index on the spot.

After :data:`SAVE_AFTER` additions the process saves the index (write to a temporary file,
then ``os.replace`` of both files under an exclusive ``flock`` of ``index.lock``; loads take
the shared lock), so the next process starts from a recent file instead of the whole table.
Two processes saving at once only overwrite one valid file with another. ``catalog
search-index rebuild`` builds the files from the database from scratch.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db import models as m
from worker.config import Settings
from worker.search.common import Hit, IndexFilters, IndexHealth, filter_conditions, passing, search_dir
from worker.search.vectors import (
    KINDS,
    StoredVectors,
    backfill_from_embeddings,
    decode,
    normalised,
)

log = logging.getLogger(__name__)

#: Ids below the watermark that a catch-up looks at again (transactions committing out of order).
OVERLAP = 2000
#: Seconds between full comparisons of the index's keys with the table.
RECONCILE_SECONDS = 300.0
#: Additions after which the process saves the index file.
SAVE_AFTER = 1000
#: Most candidates the index is asked for before an exact search over the filtered rows.
MAX_CANDIDATES = 4096
#: Most filtered rows an exact search scores (beyond it the best of the candidates are returned).
MAX_EXACT = 200_000
CONNECTIVITY, EXPANSION_ADD = 16, 64  # as pgvector: m = 16, ef_construction = 64


def usearch_index_class() -> Any:
    """``usearch.index.Index``, imported safely: onnxruntime (the segmentation and fraud models'
    CPU engine) is imported first when it is installed. With usearch 2.26 loaded first, creating
    any onnxruntime 1.32 session afterwards kills the process with a segmentation fault (seen in
    an API process that answered a "similar" query before its first photo analysis); loaded the
    other way round both work (tests/worker/search/test_pipeline.py checks it)."""
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime  # noqa: F401
    from usearch.index import Index

    return Index


@contextmanager
def _flock(path: Path, exclusive: bool) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _KindIndex:
    """The in-memory index of one kind, caught up from the database."""

    def __init__(self, directory: Path, kind: str, ef_search: int) -> None:
        self.directory, self.kind, self.ef_search = directory, kind, ef_search
        self.path = directory / f"index-{kind}.usearch"
        self.meta_path = directory / f"index-{kind}.json"
        self.lock_path = directory / "index.lock"
        self.index: Any = None
        self.dim: int | None = None
        self.watermark = 0
        self.unsaved = 0
        self.reconciled_at = 0.0
        self.mutex = threading.RLock()
        self.loaded = False

    # --- files ---------------------------------------------------------------------------

    def _new(self, dim: int) -> Any:
        return usearch_index_class()(ndim=dim, metric="cos", dtype="f16", connectivity=CONNECTIVITY,
                     expansion_add=EXPANSION_ADD, expansion_search=self.ef_search)

    def load(self) -> None:
        """Start from the saved file when there is a readable one (else from nothing)."""
        self.loaded = True
        if not self.path.is_file() or not self.meta_path.is_file():
            return
        index_class = usearch_index_class()
        try:
            with _flock(self.lock_path, exclusive=False):
                meta = json.loads(self.meta_path.read_text())
                index: Any = index_class.restore(str(self.path))
        except (OSError, ValueError, RuntimeError) as exc:
            log.warning("search index %s is unreadable (%s); it is rebuilt from the database", self.path, exc)
            return
        if index is None or int(index.ndim) != int(meta.get("dim", -1)):
            return
        index.expansion_search = self.ef_search
        self.index, self.dim, self.watermark = index, int(meta["dim"]), int(meta.get("watermark", 0))
        self.reconciled_at = 0.0  # a file may be older than deletions: compare once

    def save(self) -> None:
        if self.index is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        suffix = f".tmp{os.getpid()}.{threading.get_ident()}"
        tmp, tmp_meta = Path(f"{self.path}{suffix}"), Path(f"{self.meta_path}{suffix}")
        self.index.save(str(tmp))
        tmp_meta.write_text(json.dumps({"dim": self.dim, "watermark": self.watermark, "kind": self.kind,
                                        "count": len(self.index), "saved_at": time.time()}))
        with _flock(self.lock_path, exclusive=True):
            os.replace(tmp, self.path)
            os.replace(tmp_meta, self.meta_path)
        self.unsaved = 0

    # --- catching up -----------------------------------------------------------------------

    def _add_rows(self, session: Session, ids: list[int]) -> int:
        added = 0
        sv = m.SearchVector
        for start in range(0, len(ids), 2000):
            rows = session.execute(select(sv.id, sv.dim, sv.vector).where(sv.id.in_(ids[start:start + 2000]))).all()
            if not rows:
                continue
            if self.index is None:
                self.dim = int(rows[0][1])
                self.index = self._new(self.dim)
            keep = [(int(r[0]), decode(r[2])) for r in rows if int(r[1]) == self.dim]
            if keep:
                keys = np.array([k for k, _ in keep], dtype=np.uint64)
                self.index.add(keys, np.stack([v for _, v in keep]))
                added += len(keep)
        self.unsaved += added
        return added

    def _missing(self, ids: list[int]) -> list[int]:
        if not ids:
            return []
        if self.index is None:
            return ids
        held = np.asarray(self.index.contains(np.array(ids, dtype=np.uint64)), dtype=bool).reshape(-1)
        return [i for i, h in zip(ids, held, strict=True) if not h]

    def catch_up(self, session: Session) -> int:
        if not self.loaded:
            self.load()
        sv = m.SearchVector
        if time.monotonic() - self.reconciled_at > RECONCILE_SECONDS:
            return self.reconcile(session)
        ids = [int(i) for i in session.execute(
            select(sv.id).where(sv.kind == self.kind, sv.id > self.watermark - OVERLAP).order_by(sv.id)).scalars()]
        added = self._add_rows(session, self._missing(ids))
        if ids:
            self.watermark = max(self.watermark, ids[-1])
        if self.unsaved >= SAVE_AFTER:
            self.save()
        return added

    def reconcile(self, session: Session) -> int:
        """Compare every id of the kind with the index: add the missing, drop the gone."""
        sv = m.SearchVector
        ids = [int(i) for i in session.execute(select(sv.id).where(sv.kind == self.kind).order_by(sv.id)).scalars()]
        added = self._add_rows(session, self._missing(ids))
        if self.index is not None and len(self.index):
            present = set(ids)
            keys = np.asarray(self.index.keys, dtype=np.uint64)
            gone = [int(k) for k in keys if int(k) not in present]
            if gone:
                self.index.remove(np.array(gone, dtype=np.uint64))
                self.unsaved += len(gone)
        if ids:
            self.watermark = max(self.watermark, ids[-1])
        self.reconciled_at = time.monotonic()
        if self.unsaved:
            self.save()
        return added

    def rebuild(self, session: Session, progress: Callable[[int, int], None] | None = None) -> int:
        sv = m.SearchVector
        total = int(session.execute(select(func.count()).select_from(sv).where(sv.kind == self.kind)).scalar_one())
        self.index, self.dim, self.watermark, self.unsaved = None, None, 0, 0
        last, done = 0, 0
        while True:
            ids = [int(i) for i in session.execute(
                select(sv.id).where(sv.kind == self.kind, sv.id > last).order_by(sv.id).limit(5000)).scalars()]
            if not ids:
                break
            self._add_rows(session, ids)
            last = self.watermark = ids[-1]
            done += len(ids)
            if progress is not None:
                progress(done, total)
        self.loaded, self.reconciled_at = True, time.monotonic()
        if self.index is not None:
            self.save()
        else:
            for path in (self.path, self.meta_path):
                path.unlink(missing_ok=True)
        return len(self.index) if self.index is not None else 0

    def search(self, vector: np.ndarray, count: int) -> list[tuple[int, float]]:
        if self.index is None or len(self.index) == 0 or vector.size != self.dim:
            return []
        found = self.index.search(vector.astype(np.float32), min(count, len(self.index)))
        return [(int(k), 1.0 - float(d)) for k, d in zip(found.keys, found.distances, strict=True)]

    def forget(self, keys: list[int]) -> None:
        if self.index is not None and keys:
            held = [k for k, h in zip(keys, self.index.contains(np.array(keys, dtype=np.uint64)), strict=True) if h]
            if held:
                self.index.remove(np.array(held, dtype=np.uint64))
                self.unsaved += len(held)


class EmbeddedIndex(StoredVectors):
    """usearch indexes (one per kind) kept in memory per process, caught up from the
    database before every query (see the module doc). One instance per directory and
    ``ef_search`` per process: :meth:`for_settings`."""

    backend = "embedded"
    _instances: ClassVar[dict[tuple[str, int], EmbeddedIndex]] = {}
    _guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, directory: Path, ef_search: int) -> None:
        self.directory = directory
        self.kinds = {kind: _KindIndex(directory, kind, ef_search) for kind in KINDS}

    @classmethod
    def for_settings(cls, settings: Settings) -> EmbeddedIndex:
        key = (str(search_dir(settings)), settings.search_ef_search)
        with cls._guard:
            if key not in cls._instances:
                cls._instances[key] = cls(Path(key[0]), key[1])
            return cls._instances[key]

    @classmethod
    def forget_instances(cls) -> None:
        """Drop the per-process instances (tests; a rebuild in another process is picked up
        by the reconciliation anyway)."""
        with cls._guard:
            cls._instances.clear()

    def query(self, session: Session, vector: np.ndarray, k: int, filters: IndexFilters) -> list[Hit]:
        if filters.kind not in self.kinds:
            raise ValueError(f"unknown vector kind {filters.kind!r}")
        vec = normalised(vector)
        kind_index = self.kinds[filters.kind]
        with kind_index.mutex:
            kind_index.catch_up(session)
            count = max(4 * k, 64)
            while True:
                candidates = kind_index.search(vec, count)
                ids = [key for key, _ in candidates]
                existing = set(session.execute(select(m.SearchVector.id).where(m.SearchVector.id.in_(ids))).scalars())
                kind_index.forget([i for i in ids if i not in existing])
                ok = passing(session, ids, filters)
                hits = [Hit(key, *ok[key], filters.kind, score) for key, score in candidates if key in ok]
                if len(hits) >= k or len(candidates) < count:
                    return hits[:k]
                if count >= MAX_CANDIDATES:
                    return self._exact(session, vec, k, filters) or hits[:k]
                count *= 4

    def _exact(self, session: Session, vec: np.ndarray, k: int, filters: IndexFilters) -> list[Hit]:
        """A selective filter: score every row that passes it (at most :data:`MAX_EXACT`)."""

        sv = m.SearchVector
        rows = session.execute(
            select(sv.id, sv.image_id, sv.listing_id, sv.vector).join(m.Image, m.Image.id == sv.image_id)
            .join(m.Listing, m.Listing.id == sv.listing_id).where(*filter_conditions(filters), sv.dim == vec.size)
            .limit(MAX_EXACT)).all()
        if not rows:
            return []
        scores = np.stack([decode(r[3]) for r in rows]) @ vec
        order = np.argsort(-scores)[:k]
        return [Hit(int(rows[i][0]), int(rows[i][1]), int(rows[i][2]), filters.kind, float(scores[i]))
                for i in order]

    def rebuild(self, session: Session, progress: Callable[[int, int], None] | None = None) -> int:
        backfill_from_embeddings(session)
        session.commit()
        total = 0
        for kind_index in self.kinds.values():
            with kind_index.mutex:
                total += kind_index.rebuild(session, progress)
        return total

    def count(self, session: Session, kind: str | None = None) -> int:
        kinds = [kind] if kind else list(self.kinds)
        total = 0
        for name in kinds:
            kind_index = self.kinds[name]
            with kind_index.mutex:
                kind_index.catch_up(session)
                total += len(kind_index.index) if kind_index.index is not None else 0
        return total

    def health(self, session: Session) -> IndexHealth:
        counts = {kind: self.count(session, kind) for kind in self.kinds}
        sv = m.SearchVector
        rows = {kind: int(n) for kind, n in session.execute(
            select(sv.kind, func.count()).group_by(sv.kind)).all()}
        files = {kind: (ki.path.stat().st_size if ki.path.is_file() else None) for kind, ki in self.kinds.items()}
        behind = {kind: rows.get(kind, 0) - counts[kind] for kind in self.kinds}
        ok = all(v == 0 for v in behind.values())
        detail = f"usearch files under {self.directory}, {sum(counts.values())} vectors"
        if not ok:
            detail += f"; behind the database by {behind} (other dimensions?)"
        return IndexHealth("embedded", ok, detail, counts,
                           {"directory": str(self.directory), "file_bytes": files, "table_rows": rows})
