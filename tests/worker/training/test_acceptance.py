"""Issue 9, acceptance 1, 2 and 4 on real photos, in one process (with a real Celery worker:
test_worker_retrain.py): scikit-image's bundled photos, cut and augmented into distinct images, are
analysed by the real tagging model (embeddings and zero-shot category tags stored as the
pipeline stores them), labelled with a shop's own taxonomy (two of its six categories are not
in the zero-shot taxonomy at all), then retrained. The held-out accuracy of the head and of the
zero-shot map are printed; the figures are recorded in docs/training.md."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from db.session import transaction
from tests.support.training import analyse_and_label, augment, photo_dir
from worker.config import Settings
from worker.steps.tagging import TaggingStep, categoriser, tagging_model
from worker.training import registry
from worker.training.retrain import run_retrain

pytestmark = pytest.mark.slow  # ~150 real inferences of the tagging model

pytest.importorskip("skimage")


def test_real_photos_head_beats_zero_shot_then_worse_rejected_then_rollback(
        train_url: str, settings_for: Callable[..., Settings], capsys: pytest.CaptureFixture[str]) -> None:
    if not train_url.startswith("postgresql"):
        pytest.skip("once is enough: the Postgres run (SQLite is covered by test_retrain)")
    settings = settings_for(train_url, steps=["tagging"])
    counts = analyse_and_label(train_url, settings)

    [good] = run_retrain(settings, ["category"]) or []
    [worse] = run_retrain(settings, ["category"], shuffle_labels=True, seed=7) or []
    with capsys.disabled():
        print(f"\nreal photos: {counts['train']} train / {counts['heldout']} held-out images, 6 shop categories")
        print(f"  zero-shot taxonomy map held-out accuracy {good.baseline['accuracy']:.3f}")  # type: ignore[index]
        print(f"  retrained head         held-out accuracy {good.candidate['accuracy']:.3f}")  # type: ignore[index]
        print(f"  per-class recall: head {good.candidate['per_class_recall']}")  # type: ignore[index]
        print(f"  zero-shot per-class recall {good.baseline['per_class_recall']}")  # type: ignore[index]
        print(f"  shuffled-label candidate {worse.candidate['accuracy']:.3f}: {worse.decision}: {worse.reason}")  # type: ignore[index]
    assert good.decision == "promoted", good.reason
    assert good.candidate["accuracy"] > good.baseline["accuracy"]  # type: ignore[index]
    assert worse.decision == "rejected" and "not better than champion" in worse.reason

    # The next image in this process is categorised by the new champion, including a category the
    # taxonomy does not have; rollback makes the next one zero-shot again.
    rocket = augment(Image.open(photo_dir() / "rocket.jpg").convert("RGB"), np.random.default_rng(99))
    step = TaggingStep()
    result = tagging_model(settings).infer(rocket)
    out = step.to_step_result(result, settings, categoriser(settings))
    assert out.data["category"]["source"] == "category-head"
    assert out.data["category"]["name"] == "space posters"
    with transaction(train_url) as s:
        registry.rollback(s, settings, registry.CATEGORY_HEAD)
    out = step.to_step_result(result, settings, categoriser(settings))
    assert out.data["category"]["source"] == "category-map" and out.data["category"]["name"] != "space posters"
