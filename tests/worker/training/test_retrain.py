"""The retrain end to end on seeded labels: promotion when better, a worse candidate rejected
with its reason, rollback, the champion file the tagging step reads, the fraud scorer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from db import models as m
from db.session import transaction
from tests.support.training import CATEGORIES, seed_catalogue, seed_verdicts
from worker.config import Settings
from worker.steps.tagging import CategoryHead, categoriser, head_path
from worker.training import registry
from worker.training.retrain import decide_category, decide_fraud, run_retrain


def _runs(url: str) -> list[m.TrainingRun]:
    with transaction(url) as s:
        return list(s.scalars(select(m.TrainingRun).order_by(m.TrainingRun.id)))


@pytest.mark.slow  # trains heads; the first optimiser step of a process pays ~2 s of lazy imports
def test_category_head_beats_zero_shot_is_promoted_and_used(train_url: str, settings_for: Callable[..., Settings],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    seeded = seed_catalogue(train_url)
    settings = settings_for(train_url)
    assert head_path(settings) is None  # no champion yet: the tagging step uses the taxonomy map

    [report] = run_retrain(settings, ["category"]) or []
    cand, base = report.candidate or {}, report.baseline or {}

    with capsys.disabled():
        print(f"\n[{train_url.split(':')[0]}] held-out ({seeded.heldout} images): head accuracy "
              f"{cand['accuracy']:.3f} vs zero-shot map {base['accuracy']:.3f}")
    assert report.decision == "promoted", report.reason
    assert report.baseline_name == "zero-shot taxonomy map"
    assert cand["accuracy"] > base["accuracy"] + 0.2
    assert cand["per_class_recall"]["vinyl-records"] > 0.8  # a class the taxonomy lacks
    champion = registry.current_champion_path(settings, registry.CATEGORY_HEAD)
    assert champion is not None and head_path(settings) == champion
    head = CategoryHead.load(champion)
    assert set(head.classes) == set(CATEGORIES)
    assert categoriser(settings).source == "category-head"
    [run] = _runs(train_url)
    assert (run.status, run.decision) == ("succeeded", "promoted")
    counts = run.label_counts or {}
    assert counts["train"] + counts["heldout"] == len(seeded.images)
    assert Path(run.metrics["plot"]).is_file() and run.metrics["plot"].endswith(".png")
    with transaction(train_url) as s:
        version = s.get_one(m.ModelVersion, run.model_version_id)
        assert version.status == "champion" and version.training_run_id == run.id
        assert version.checksum == registry.file_sha256(Path(str(version.path)))
        # the version the tagging step records on its tags is this row's
        assert head.version == f"{version.name}@{version.version}"


@pytest.mark.slow  # trains heads; the first optimiser step of a process pays ~2 s of lazy imports
def test_worse_candidate_is_not_promoted_and_rollback_restores(train_url: str,
                                                               settings_for: Callable[..., Settings]) -> None:
    seed_catalogue(train_url)
    settings = settings_for(train_url)
    [good] = run_retrain(settings, ["category"]) or []
    assert good.decision == "promoted"
    first_bytes = registry.champion_file(settings, registry.CATEGORY_HEAD).read_bytes()

    [bad] = run_retrain(settings, ["category"], shuffle_labels=True, seed=1) or []
    assert bad.decision == "rejected"
    assert "not better than champion" in bad.reason and "accuracy" in bad.reason
    assert registry.champion_file(settings, registry.CATEGORY_HEAD).read_bytes() == first_bytes
    runs = _runs(train_url)
    assert [r.decision for r in runs] == ["promoted", "rejected"]
    assert runs[1].reason == bad.reason

    # A second real champion (a different seed), then rollback returns to the first.
    with transaction(train_url) as s:
        candidate = s.scalars(select(m.ModelVersion).where(m.ModelVersion.training_run_id == runs[1].id)).one()
        assert candidate.status == "candidate"
        registry.promote(s, settings, candidate)  # an operator's `catalog models promote`
    assert registry.champion_file(settings, registry.CATEGORY_HEAD).read_bytes() != first_bytes
    with transaction(train_url) as s:
        retired, restored = registry.rollback(s, settings, registry.CATEGORY_HEAD)
        assert restored is not None and good.version == f"{restored.name}@{restored.version}"
    assert registry.champion_file(settings, registry.CATEGORY_HEAD).read_bytes() == first_bytes
    with transaction(train_url) as s:
        registry.rollback(s, settings, registry.CATEGORY_HEAD)  # no earlier champion: back to the map
    assert head_path(settings) is None
    with transaction(train_url) as s, pytest.raises(registry.RegistryError, match="no champion"):
        registry.rollback(s, settings, registry.CATEGORY_HEAD)


def test_too_few_labels_is_skipped_with_reason(train_url: str, settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(train_url)
    reports = run_retrain(settings, ["category", "fraud", "detector"]) or []
    assert [r.decision for r in reports] == ["skipped"] * 3
    assert reports[0].reason == "skipped: no reviewed category labels"
    assert "too few flag verdicts" in reports[1].reason
    assert [r.reason for r in _runs(train_url)] == [r.reason for r in reports]


def test_fraud_scorer_learns_weights_and_beats_fixed(train_url: str, settings_for: Callable[..., Settings],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    seed_verdicts(train_url)
    settings = settings_for(train_url)
    [report] = run_retrain(settings, ["fraud"]) or []
    cand, base = report.candidate or {}, report.baseline or {}
    with capsys.disabled():
        print(f"\nfraud held-out: log loss {cand['log_loss']} vs fixed {base['log_loss']}, "
              f"AUC {cand['auc']} vs {base['auc']}, ECE {cand['ece']}")
    assert report.decision == "promoted", report.reason
    assert cand["log_loss"] < base["log_loss"]
    weights = json.loads(registry.champion_file(settings, registry.FRAUD_SCORER).read_text())["weights"]
    assert weights["contact_info"] > 0.8 and weights["duplicate_image"] < 0.3

    [again] = run_retrain(settings, ["fraud"], shuffle_labels=True, seed=3) or []
    assert again.decision == "rejected" and "log loss" in again.reason


def test_decision_rules() -> None:
    base = {"accuracy": 0.5, "per_class_recall": {"a": 0.9, "b": 0.1}}
    assert decide_category({"accuracy": 0.51, "per_class_recall": {"a": 0.9, "b": 0.12}}, base, 0.02)[0] is False
    ok, why = decide_category({"accuracy": 0.6, "per_class_recall": {"a": 0.85, "b": 0.35}}, base, 0.02)
    assert not ok and "a (-0.05)" in why  # better overall, but a guard metric dropped
    assert decide_category({"accuracy": 0.6, "per_class_recall": {"a": 0.89, "b": 0.3}}, base, 0.02)[0]
    assert decide_fraud({"log_loss": 0.4, "auc": 0.7}, {"log_loss": 0.5, "auc": 0.8}, 0.02)[0] is False
    assert decide_fraud({"log_loss": 0.4, "auc": 0.79}, {"log_loss": 0.5, "auc": 0.8}, 0.02)[0] is True
