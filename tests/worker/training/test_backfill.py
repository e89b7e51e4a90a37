"""`catalog backfill`: after a promotion, the images analysed with the older tagging version are
analysed again (normal pipeline path), throttled, bounded and resumable; fraud-scorer re-scores
listings; the retrain enqueues it when CATALOG_BACKFILL_AFTER_PROMOTE is on."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from sqlalchemy import select

from db import models as m
from db.session import transaction
from tests.support.images import write_photo
from worker.cli.main import main
from worker.config import Settings, reset_settings
from worker.pipeline.local import run_in_process
from worker.training import registry
from worker.training.backfill import BackfillError, backfill, cursor_path, step_of
from worker.training.category import save_head
from worker.training.retrain import BACKFILL_TASK, RunReport, after_promotion

pytestmark = pytest.mark.slow  # real tagging inferences (about 10)


def _tagging_versions(url: str) -> dict[int, str]:
    with transaction(url) as s:
        rows = s.execute(select(m.StepRunRecord.image_id, m.StepRunRecord.model_version)
                         .where(m.StepRunRecord.step == "tagging")).all()
        return {row[0]: row[1] for row in rows}


def _promote_fixed_head(settings: Settings, url: str) -> str:
    linear = torch.nn.Linear(1280, 2)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.tensor([5.0, 0.0]))
    path = save_head(linear, ["space posters", "other"], registry.model_dir(settings, "category-head") / "v" / "h.pt")
    with transaction(url) as s:
        row = registry.register(s, registry.CATEGORY_HEAD, path, {}, None)
        registry.promote(s, settings, row)
        return f"category-head@{row.version}"


def test_backfill_reanalyses_older_images_throttled_and_resumable(
        train_url: str, settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    if not train_url.startswith("sqlite"):
        pytest.skip("the pipeline path is the same on both databases (covered by tests/worker/pipeline)")
    photos = tmp_path / "photos"
    photos.mkdir()
    settings = settings_for(train_url, steps=["tagging"], fetch_allow_dirs=str(photos))
    refs = [str(write_photo(photos / f"p{i}.jpg", size=(320, 240), seed=i)) for i in range(3)]
    for i, ref in enumerate(refs):
        run_in_process(settings, [ref], "s", None, f"bf-{i}", progress=False)
    before = _tagging_versions(train_url)
    assert len(before) == 3 and not any("category-head" in v for v in before.values())

    version = _promote_fixed_head(settings, train_url)
    waits: list[float] = []
    first = backfill(settings, "category-head", limit=2, rate=0.5, sleep=waits.append)
    assert (first.done, first.failed, first.remaining) == (2, 0, True)
    assert first.target.endswith(f"+{version}") and first.step == "tagging"
    # 0.5/s: the second image is held back to 2 s after the first (minus the first's analysis)
    assert len(waits) == 1 and 0.5 < waits[0] <= 2.0
    after_first = _tagging_versions(train_url)
    assert sorted(i for i, v in after_first.items() if v == first.target) == sorted(before)[:2]
    assert json.loads(cursor_path(settings, "category-head").read_text())["after"] == sorted(before)[1]

    second = backfill(settings, "category-head")  # continues after the cursor
    assert (second.done, second.remaining, second.cursor) == (1, False, sorted(before)[2])
    assert set(_tagging_versions(train_url).values()) == {first.target}
    with transaction(train_url) as s:
        heads = s.scalars(select(m.Tag.name).where(m.Tag.source == "category-head")).all()
        done = s.scalars(select(m.Listing.status)).all()
    assert heads == ["space posters"] * 3 and done == ["done"] * 3
    assert backfill(settings, "category-head").done == 0  # nothing older is left

    # A rollback is a new target: everything is older again, and the cursor starts over.
    with transaction(train_url) as s:
        registry.rollback(s, settings, registry.CATEGORY_HEAD)
    again = backfill(settings, "category-head")
    assert again.done == 3 and "category-head" not in again.target


def test_fraud_scorer_backfill_rescores_listings_and_bad_models(
        train_url: str, settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(train_url, fraud_weights={"contact_info": 0.2})
    with transaction(train_url) as s:
        listing = m.Listing(external_id="fb-1", seller_id="s", title="", status="done", fraud_score=0.2,
                            fraud_decision="ok")
        s.add(listing)
        s.flush()
        image = m.Image(listing_id=listing.id, url="https://x/a.jpg", status="done", complete=True)
        s.add(image)
        s.flush()
        s.add(m.Flag(listing_id=listing.id, image_id=image.id, kind="contact_info", score=1.0, evidence={},
                     model_version="t"))
    path = registry.model_dir(settings, registry.FRAUD_SCORER) / "v" / "w.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"weights": {"contact_info": 0.9}}))
    with transaction(train_url) as s:
        registry.promote(s, settings, registry.register(s, registry.FRAUD_SCORER, path, {}, None))
    report = backfill(settings, "fraud-scorer")
    assert report.done == 1 and report.step is None and report.target.startswith("fraud-scorer@")
    with transaction(train_url) as s:
        assert s.scalars(select(m.Listing.fraud_score)).one() == 0.9
    with pytest.raises(BackfillError, match="unknown model"):
        step_of("colour-head")
    with pytest.raises(BackfillError, match="not in CATALOG_STEPS"):
        backfill(settings, "category-head")  # settings run the metadata step only


def test_cli_and_enqueue_after_promotion(train_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         settings_for: Callable[..., Settings]) -> None:
    monkeypatch.setenv("CATALOG_DATABASE_URL", train_url)
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path / "data"))
    reset_settings()
    runner = CliRunner()
    result = runner.invoke(main, ["backfill", "--model", "fraud-scorer", "--rate", "5/s", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["done"] == 0
    bad = runner.invoke(main, ["backfill", "--model", "fraud-scorer", "--rate", "fast"])
    assert bad.exit_code == 2 and "items per second" in bad.output
    unknown = runner.invoke(main, ["backfill", "--model", "nope"])
    assert unknown.exit_code == 1 and "unknown model 'nope'" in unknown.output

    sent: list[tuple[str, dict[str, object]]] = []
    from worker.celery_app import app

    monkeypatch.setattr(app, "send_task", lambda name, kwargs: sent.append((name, kwargs)))
    promoted = [RunReport("category", "promoted", "", 1, "category-head@abcd1234"),
                RunReport("fraud", "rejected", "", 2, "fraud-scorer@00000000")]
    after_promotion(settings_for(train_url), promoted)
    assert sent == []  # off by default
    after_promotion(settings_for(train_url, backfill_after_promote=True), promoted)
    assert sent == [(BACKFILL_TASK, {"model": "category-head"})]
