"""The embedded default end to end: SQLite file, filesystem broker, a separate
`catalog worker` process, no servers at all."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.support.images import write_not_an_image, write_photo
from tests.support.procs import Proc, catalog_env, run_catalog, wait_for

pytestmark = pytest.mark.slow


def listing_done(db: Path, external_id: str) -> bool:
    if not db.exists():
        return False
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT status FROM listings WHERE external_id = ?", (external_id,)).fetchone()
    return bool(row) and row[0] == "done"


def test_submit_to_embedded_worker(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # Point Redis and Postgres at closed ports: nothing in this path may need a server.
    photos = tmp_path / "photos"
    photos.mkdir()
    env = catalog_env(data_dir=str(data), redis_url="redis://127.0.0.1:1/0", steps="metadata",
                      fetch_allow_dirs=str(photos))
    a = write_photo(photos / "a.jpg", size=(256, 192), seed=7)
    b = write_not_an_image(photos / "b.jpg")
    events = tmp_path / "events.jsonl"
    ev = {"event_id": "emb-1", "type": "listing.created", "occurred_at": datetime.now(UTC).isoformat(),
          "listing": {"id": "L-emb", "seller_id": "s", "images": [str(a), str(b)]}}
    events.write_text("\n".join(json.dumps(ev) for _ in range(2)) + "\n")

    submitted = run_catalog(["submit", str(events)], env)
    assert submitted.returncode == 0, submitted.stderr
    assert "queued 2" in submitted.stdout

    worker = Proc(["worker", "--concurrency", "1"], env, tmp_path / "worker.log")
    try:
        db = data / "catalog.db"

        wait_for(lambda: listing_done(db, "L-emb"), 120, "embedded listing done", [worker])
    finally:
        worker.stop()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM listings").fetchone() == (1,)
        rows = conn.execute("SELECT status, width, substr(error, 1, 13) FROM images ORDER BY position").fetchall()
        assert rows == [("done", 256, None), ("failed", None, "not_an_image:")]
        assert conn.execute("SELECT count(*) FROM processed_events").fetchone() == (1,)


def test_prefork_worker_runs_every_model_step(tmp_path: Path) -> None:
    """The models load lazily in the forked pool child (never in the Celery parent) and the
    whole default pipeline runs there."""
    from PIL import Image
    from skimage import data

    data_dir = tmp_path / "data"
    photo = tmp_path / "photos" / "coffee.jpg"
    photo.parent.mkdir()
    env = catalog_env(data_dir=str(data_dir), torch_threads="1", fetch_allow_dirs=str(photo.parent))
    Image.fromarray(data.coffee()).save(photo, quality=92)
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps({
        "event_id": "full-1", "type": "listing.created", "occurred_at": datetime.now(UTC).isoformat(),
        "listing": {"id": "L-full", "seller_id": "s", "category": "kitchenware", "images": [str(photo)]}}) + "\n")
    assert run_catalog(["submit", str(events)], env).returncode == 0

    worker = Proc(["worker", "--concurrency", "1"], env, tmp_path / "worker.log")
    db = data_dir / "catalog.db"
    try:
        wait_for(lambda: listing_done(db, "L-full"), 240, "full pipeline in a prefork child", [worker])
    finally:
        worker.stop()
    with sqlite3.connect(db) as conn:
        steps = dict(conn.execute("SELECT step, status FROM step_runs").fetchall())
        tags = {(s, n) for s, n in conn.execute("SELECT source, name FROM tags")}
        labels = {r[0] for r in conn.execute("SELECT label FROM detections")}
        kinds = {r[0] for r in conn.execute("SELECT kind FROM artifacts")}
    assert set(steps.values()) == {"ok"} and "segmentation" in steps and "contact_info" in steps
    assert ("category-map", "kitchenware") in tags and ("imagenet", "espresso") in tags
    assert "cup" in labels and "cutout" in kinds
