"""Issue 9, acceptance 1 end to end: the head a real `catalog worker` (Celery, Redis, Postgres)
picks up is the output of a retrain run in this same test, not a fixed file.

Real photos (scikit-image's, cut and augmented) are analysed and labelled with a shop's own
taxonomy (tests/support/training.py), the worker categorises a new rocket photo with the
zero-shot map (the taxonomy has no "space posters"), `run_retrain` trains and promotes a head
from the reviewed labels, and the worker's next listing, another rocket photo, is categorised
"space posters" by that head, whose version its tag names; the worker is never restarted."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
from PIL import Image

from tests.support.procs import Proc, wait_for
from tests.support.training import analyse_and_label, augment, listing_category, photo_dir, submit_listing
from worker.config import load_settings
from worker.steps.tagging import head_path
from worker.training.retrain import run_retrain

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]
pytest.importorskip("skimage")


def test_running_worker_uses_the_head_this_retrain_promoted(deployment: dict,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    d = deployment
    rocket = Image.open(photo_dir() / "rocket.jpg").convert("RGB")
    photos = []
    for i in range(2):
        path = d["photos"] / f"rocket-{i}.jpg"
        augment(rocket, np.random.default_rng(1000 + i)).save(path, quality=92)
        photos.append(path)
    # Every category score is stored as a tag, so the zero-shot map's (weak) guess for a rocket shows.
    d["env"]["CATALOG_CATEGORY_MIN_SCORE"] = "0"
    procs = [Proc(["worker", "--concurrency", "1"], d["env"], d["tmp"] / "worker.log"),
             Proc(["ingest"], d["env"], d["tmp"] / "ingest.log")]
    d["procs"].extend(procs)
    settings = load_settings(database_url=d["url"], data_dir=d["data"], steps=["tagging"])
    counts = analyse_and_label(d["url"], settings)  # the labelled catalogue, while the worker starts

    submit_listing(d, "before", photos[0])
    before = wait_for(partial(listing_category, d, "before"), 180, "first listing analysed", procs)
    assert before[1] == "category-map" and before[0] != "space posters"  # type: ignore[index]

    assert head_path(settings) is None
    [report] = run_retrain(settings, ["category"]) or []
    assert report.decision == "promoted", report.reason
    assert report.version and report.version.startswith("category-head@")

    submit_listing(d, "after", photos[1])
    after = wait_for(partial(listing_category, d, "after"), 120, "second listing analysed", procs)
    with capsys.disabled():
        print(f"\nworker before the retrain: {before[0]} ({before[1]}); retrain on {counts['train']} train / "  # type: ignore[index]
              f"{counts['heldout']} held-out: {report.candidate['accuracy']:.3f} vs "  # type: ignore[index]
              f"{report.baseline['accuracy']:.3f}, {report.version}; worker after: {after[0]} ({after[1]})")  # type: ignore[index]
    assert after[:2] == ("space posters", "category-head")  # type: ignore[index]
    assert after[2].endswith(f"+{report.version}")  # type: ignore[index]
    assert all(p.popen.poll() is None for p in procs)  # never restarted
