"""Search vectors through the real pipeline and the embedded index's consistency model.

* a real photo analysed with tagging, segmentation and the ``embedding`` step stores a ``full``
  and a different ``region`` vector (the product crop), found by ``similar``; analysing it again
  replaces them; a failed analysis and ``listing.deleted`` take them out;
* the embedded index catches up with rows other processes commit, reloads its saved file,
  forgets rows that are gone, and a full reconciliation finds rows below its watermark;
* ``catalog search-index rebuild`` / ``status`` and the backfill of images analysed before
  search existed; migration 0007 copies existing tagging embeddings.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sqlalchemy import select, text

from db import models as m
from db.migrate import upgrade
from db.session import session_factory
from tests.support.pipeline import analyze_all, apply, event
from tests.support.services import unique
from worker.config import Settings, reset_settings
from worker.search.embedded import OVERLAP, EmbeddedIndex
from worker.search.index import IndexFilters, open_index
from worker.search.similar import SimilarQuery, similar, vector_for_image
from worker.search.vectors import decode, encode

skimage = pytest.importorskip("skimage")


def _coffee(tmp_path: Path) -> str:
    path = tmp_path / "coffee.png"
    shutil.copy(Path(skimage.__file__).parent / "data" / "coffee.png", path)
    return str(path)


def _vectors(url: str, image_id: int) -> dict[str, np.ndarray]:
    with session_factory(url)() as s:
        rows = s.execute(select(m.SearchVector.kind, m.SearchVector.vector)
                         .where(m.SearchVector.image_id == image_id)).all()
    return {kind: decode(blob) for kind, blob in rows}


def test_real_photo_gets_full_and_region_vectors_and_loses_them_when_deleted(
        tmp_path: Path, make_settings: Callable[..., Settings], sqlite_template: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    shutil.copy(sqlite_template, tmp_path / "catalog.db")
    settings = make_settings(database_url=url, steps=["metadata", "tagging", "segmentation", "embedding"],
                             fetch_allow_dirs=[str(tmp_path)])
    photo = _coffee(tmp_path)
    listing_ref = unique("L")
    created = apply(url, event(listing_ref, [photo], seller="s1"))
    [done] = analyze_all(url, settings, created.images_to_analyze)
    assert done.status == "done", done.detail
    [image_id] = created.images_to_analyze
    vectors = _vectors(url, image_id)
    assert set(vectors) == {"full", "region"}
    assert all(v.shape == (1280,) and abs(float(np.linalg.norm(v)) - 1) < 1e-3 for v in vectors.values())
    cosine = float(vectors["full"] @ vectors["region"])
    assert 0.3 < cosine < 0.999, cosine  # the crop, not the photo again
    with session_factory(url)() as s:
        run = s.execute(select(m.StepRunRecord).where(m.StepRunRecord.image_id == image_id,
                                                      m.StepRunRecord.step == "embedding")).scalar_one()
        assert run.status == "ok" and run.output["source"] == "segmentation" and len(run.output["region"]) == 4
        # another seller's listing of the same photo is found from this one
        other = m.Listing(external_id=unique("L"), seller_id="s2", title="t", status="done")
        s.add(other)
        s.flush()
        twin = m.Image(listing_id=other.id, url="https://x.example/c.png", status="done")
        s.add(twin)
        s.flush()
        version = s.execute(select(m.SearchVector.model_version).where(m.SearchVector.image_id == image_id)).scalar()
        assert version is not None and version.startswith("efficientnet-lite0") and "+" not in version
        open_index(settings, s).upsert(s, twin.id, other.id, {kind: (vec, version) for kind, vec in vectors.items()})
        s.commit()
        qv = vector_for_image(s, settings, image_id)
        assert qv.kind == "region"
        assert [r.listing_id for r in similar(s, settings, SimilarQuery.from_vector(qv))] == [other.id]
    # analysing the same listing again (new bytes) replaces the vectors
    Path(photo).unlink()
    cat = photo.replace(".png", "2.png")
    Image.open(Path(skimage.__file__).parent / "data" / "chelsea.png").convert("RGB").save(cat)
    updated = apply(url, event(listing_ref, [cat], seller="s1", etype="listing.updated"))
    analyze_all(url, settings, updated.images_to_analyze)
    [new_image] = updated.images_to_analyze
    assert not _vectors(url, image_id) and set(_vectors(url, new_image)) == {"full", "region"}
    assert float(_vectors(url, new_image)["full"] @ vectors["full"]) < 0.6
    # listing.deleted takes the listing out of the index in its own transaction
    apply(url, event(listing_ref, [], seller="s1", etype="listing.deleted"))
    assert not _vectors(url, new_image)


def test_failed_analysis_removes_the_vectors(tmp_path: Path, make_settings: Callable[..., Settings],
                                             sqlite_template: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    shutil.copy(sqlite_template, tmp_path / "catalog.db")
    settings = make_settings(database_url=url, steps=["metadata", "tagging"], fetch_allow_dirs=[str(tmp_path)])
    photo = _coffee(tmp_path)
    ref = unique("L")
    created = apply(url, event(ref, [photo]))
    analyze_all(url, settings, created.images_to_analyze)
    [image_id] = created.images_to_analyze
    assert set(_vectors(url, image_id)) == {"full", "region"}  # no region step: region = full
    Path(photo).write_bytes(b"not an image")
    with session_factory(url)() as s, s.begin():
        s.get_one(m.Image, image_id).status = "pending"
    [outcome] = analyze_all(url, settings, [image_id])
    assert outcome.status == "failed"
    assert _vectors(url, image_id) == {}


def _add(url: str, vec: np.ndarray, seller: str = "s") -> tuple[int, int]:
    with session_factory(url)() as s, s.begin():
        listing = m.Listing(external_id=unique("L"), seller_id=seller, title="t", status="done")
        s.add(listing)
        s.flush()
        image = m.Image(listing_id=listing.id, url="https://x.example/p.jpg", status="done")
        s.add(image)
        s.flush()
        for kind in ("full", "region"):
            s.add(m.SearchVector(image_id=image.id, listing_id=listing.id, kind=kind, model_version="b@1",
                                 dim=vec.size, vector=encode(vec)))
        return listing.id, image.id


def test_embedded_index_catches_up_reloads_and_forgets(tmp_path: Path, sqlite_template: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    shutil.copy(sqlite_template, tmp_path / "catalog.db")
    rng = np.random.default_rng(3)

    def unit() -> np.ndarray:
        v = rng.standard_normal(64).astype(np.float32)
        return v / np.linalg.norm(v)

    factory = session_factory(url)
    a, b = unit(), unit()
    first = _add(url, a)
    reader = EmbeddedIndex(tmp_path / "search", 100)  # one process's index
    with factory() as s:
        assert [h.image_id for h in reader.query(s, a, 5, IndexFilters())] == [first[1]]
    second = _add(url, b)  # committed by "another process" after the reader loaded
    with factory() as s:
        assert [h.image_id for h in reader.query(s, b, 1, IndexFilters())] == [second[1]]
        assert reader.rebuild(s) == 4  # writes the files
    assert (tmp_path / "search" / "index-full.usearch").is_file()
    third = _add(url, unit())
    fresh = EmbeddedIndex(tmp_path / "search", 100)  # a new process: loads the file, catches up
    with factory() as s:
        assert fresh.count(s, "full") == 3
        assert fresh.kinds["full"].watermark >= third[1]
        # a listing deleted elsewhere: its rows are gone, the hit is dropped and forgotten
        s.execute(text("DELETE FROM search_vectors WHERE listing_id = :l"), {"l": second[0]})
        s.commit()
        assert second[1] not in [h.image_id for h in fresh.query(s, b, 3, IndexFilters())]
        assert fresh.count(s, "full") == 2 or len(fresh.kinds["full"].index) == 2
    # a row committed late with an id far below the watermark (out-of-order commit): the
    # overlap window does not see it, the periodic reconciliation does
    late = _add(url, unit())
    kind = fresh.kinds["full"]
    kind.watermark = late[1] + 10 * OVERLAP  # pretend many rows came after it
    with factory() as s:
        kind.catch_up(s)
        held = bool(np.asarray(kind.index.contains(np.array([_vector_id(s, late[1])], dtype=np.uint64))).all())
        assert not held
        kind.reconciled_at = 0.0
        kind.catch_up(s)
        assert bool(np.asarray(kind.index.contains(np.array([_vector_id(s, late[1])], dtype=np.uint64))).all())


def _vector_id(session: object, image_id: int) -> int:
    from sqlalchemy.orm import Session

    assert isinstance(session, Session)
    return int(session.execute(select(m.SearchVector.id).where(
        m.SearchVector.image_id == image_id, m.SearchVector.kind == "full")).scalar_one())


def test_rebuild_backfills_images_analysed_before_search(tmp_path: Path, make_settings: Callable[..., Settings],
                                                         sqlite_template: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    shutil.copy(sqlite_template, tmp_path / "catalog.db")
    vec = np.ones(1280, np.float32) / np.sqrt(1280)
    with session_factory(url)() as s, s.begin():
        listing = m.Listing(external_id="old", seller_id="s", title="t", status="done")
        gone = m.Listing(external_id="gone", seller_id="s", title="t", status="deleted")
        s.add_all([listing, gone])
        s.flush()
        for lst in (listing, gone):
            img = m.Image(listing_id=lst.id, url="https://x.example/a.jpg", status="done")
            s.add(img)
            s.flush()
            s.add(m.Embedding(image_id=img.id, model_version="efficientnet-lite0-imagenet@ab+category-head@cd",
                              dim=1280, vector=encode(vec)))
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CATALOG_DATABASE_URL", url)
    from worker.cli.main import main

    runner = CliRunner()
    status = runner.invoke(main, ["search-index", "status"])
    assert status.exit_code == 0 and "full 0, region 0" in status.output
    rebuilt = runner.invoke(main, ["search-index", "rebuild"])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "embedded index rebuilt: 2 vectors (full 1, region 1)" in rebuilt.output
    with session_factory(url)() as s:
        rows = s.execute(select(m.SearchVector.kind, m.SearchVector.model_version)).all()
    assert sorted(rows) == [("full", "efficientnet-lite0-imagenet@ab"), ("region", "efficientnet-lite0-imagenet@ab")]
    status = runner.invoke(main, ["search-index", "status", "--json"])
    assert status.exit_code == 0 and '"backend": "embedded"' in status.output
    monkeypatch.setenv("CATALOG_SEARCH_BACKEND", "pgvector")
    reset_settings()
    refused = runner.invoke(main, ["search-index", "status"])
    assert refused.exit_code == 1 and "CATALOG_SEARCH_BACKEND=pgvector cannot work" in refused.output


def test_migration_0007_copies_existing_embeddings(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0006_outbox")
    vec = encode(np.ones(1280, np.float32) / np.sqrt(1280))
    with session_factory(url)() as s, s.begin():
        s.execute(text("INSERT INTO listings (id, external_id, seller_id, title, status, created_at, updated_at) "
                       "VALUES (1, 'a', 's', 't', 'done', '2026-01-01', '2026-01-01'), "
                       "(2, 'b', 's', 't', 'deleted', '2026-01-01', '2026-01-01')"))
        s.execute(text("INSERT INTO images (id, listing_id, position, url, status, attempts, created_at, updated_at) "
                       "VALUES (1, 1, 0, 'u', 'done', 1, '2026-01-01', '2026-01-01'), "
                       "(2, 2, 0, 'u', 'done', 1, '2026-01-01', '2026-01-01'), "
                       "(3, 1, 1, 'u', 'failed', 1, '2026-01-01', '2026-01-01')"))
        for image_id in (1, 2, 3):
            s.execute(text("INSERT INTO embeddings (image_id, model_version, dim, vector) VALUES (:i, 'v', 1280, :v)"),
                      {"i": image_id, "v": vec})
    upgrade(url)
    with session_factory(url)() as s:
        rows = s.execute(select(m.SearchVector.image_id, m.SearchVector.kind, m.SearchVector.listing_id)).all()
    assert rows == [(1, "full", 1)]


def test_usearch_then_onnxruntime_does_not_crash_the_process(tmp_path: Path) -> None:
    """usearch 2.26 loaded before onnxruntime 1.32 makes the first onnxruntime session segfault:
    the embedded index imports onnxruntime first. In a fresh process, as an API process would:
    answer a query from the embedded index, then run the segmentation model."""
    pytest.importorskip("onnxruntime")
    script = tmp_path / "order.py"
    script.write_text(
        "import numpy as np\n"
        "from worker.search.embedded import usearch_index_class\n"
        "index = usearch_index_class()(ndim=8, metric='cos', dtype='f16')\n"
        "index.add(np.arange(4, dtype=np.uint64), np.random.rand(4, 8).astype('f4'))\n"
        "index.search(np.random.rand(8).astype('f4'), 2)\n"
        "from worker.config import load_settings\n"
        "from worker.steps.segmentation import build_segmenter\n"
        "from PIL import Image\n"
        "mask = build_segmenter(load_settings(data_dir='" + str(tmp_path) + "')).infer(Image.new('RGB', (64, 64)))\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[3])
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (done.returncode, done.stderr[-2000:])
