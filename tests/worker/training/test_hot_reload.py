"""Hot reload: the tagging step reads the champion file per image, so promote and rollback
change the categories of the next image in the same process, without a restart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import select

from db import models as m
from db.session import transaction
from worker.config import Settings
from worker.steps.tagging import TaggingStep, categoriser, head_path
from worker.training import registry
from worker.training.category import save_head


def _head(settings: Settings, url: str, classes: list[str], bias: int, tag: str) -> m.ModelVersion:
    linear = torch.nn.Linear(1280, len(classes))
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
        linear.bias[bias] = 5.0  # always says classes[bias]
    path = save_head(linear, classes, registry.model_dir(settings, registry.CATEGORY_HEAD) / "versions" / f"{tag}.pt")
    with transaction(url) as s:
        return registry.register(s, registry.CATEGORY_HEAD, path, {}, None)


def test_promote_and_rollback_reach_the_next_image(train_url: str, settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(train_url, steps=["tagging"])
    embedding = np.zeros(1280, dtype=np.float32)
    step = TaggingStep()
    zero_shot_version = step.version(settings)
    assert categoriser(settings).source == "category-map"

    first = _head(settings, train_url, ["bags", "vinyl-records"], 1, "first")
    second = _head(settings, train_url, ["bags", "vinyl-records"], 0, "second")
    with transaction(train_url) as s:
        registry.promote(s, settings, s.get_one(m.ModelVersion, first.id))
    scorer = categoriser(settings)
    assert scorer.head is not None and scorer.head.scores(embedding)[0][0] == "vinyl-records"
    assert step.version(settings) == f"{zero_shot_version}+category-head@{first.version}"

    with transaction(train_url) as s:
        registry.promote(s, settings, s.get_one(m.ModelVersion, second.id))
    scorer = categoriser(settings)
    assert scorer.head is not None and scorer.head.scores(embedding)[0][0] == "bags"
    assert step.version(settings).endswith(f"+category-head@{second.version}")

    with transaction(train_url) as s:
        registry.rollback(s, settings, registry.CATEGORY_HEAD)
        statuses = {row.id: row.status for row in s.execute(select(m.ModelVersion.id, m.ModelVersion.status))}
    assert statuses == {first.id: "champion", second.id: "retired"}
    assert categoriser(settings).head.scores(embedding)[0][0] == "vinyl-records"  # type: ignore[union-attr]

    with transaction(train_url) as s:
        registry.rollback(s, settings, registry.CATEGORY_HEAD)
    assert head_path(settings) is None and categoriser(settings).source == "category-map"
    assert step.version(settings) == zero_shot_version


def test_configured_head_path_wins_over_the_champion(train_url: str, settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(train_url)
    version = _head(settings, train_url, ["a", "b"], 0, "x")
    with transaction(train_url) as s:
        registry.promote(s, settings, s.get_one(m.ModelVersion, version.id))
    pinned = settings_for(train_url, category_head_path=version.path)
    assert head_path(pinned) == Path(str(version.path)) and head_path(settings) == registry.champion_file(
        settings, registry.CATEGORY_HEAD)


def test_promote_refuses_a_tampered_artifact(train_url: str, settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(train_url)
    version = _head(settings, train_url, ["a", "b"], 0, "y")
    with open(version.path, "ab") as f:  # type: ignore[arg-type]
        f.write(b"x")
    with transaction(train_url) as s:
        try:
            registry.promote(s, settings, s.get_one(m.ModelVersion, version.id))
        except registry.RegistryError as exc:
            assert "does not match its checksum" in str(exc)
        else:
            raise AssertionError("a tampered artifact was promoted")
    assert head_path(settings) is None
