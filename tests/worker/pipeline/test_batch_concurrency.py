"""A message of several images computes them at once where the model runtime batches
(``CATALOG_BATCH_MAX_SIZE`` > 1, the CUDA default), so one message fills the dynamic batcher
like that many single-image tasks would; one at a time otherwise. Same stored results either way."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import ClassVar

from db import models as m
from db.session import session_factory
from tests.support.pipeline import apply, event, photo
from tests.support.services import unique
from worker.config import Settings
from worker.pipeline import analyze as analyze_module
from worker.pipeline import registry
from worker.pipeline.analyze import analyze_images
from worker.pipeline.contract import ImageContext, StepResult


class _Overlap:
    """A step that records how many images were inside it at the same time."""

    name: ClassVar[str] = "overlap_probe"
    requires: ClassVar[tuple[str, ...]] = ()
    lock = threading.Lock()
    inside = 0
    most = 0

    def version(self, settings: Settings) -> str:
        return "overlap@1"

    def run(self, ctx: ImageContext) -> StepResult:
        cls = type(self)
        with cls.lock:
            cls.inside += 1
            cls.most = max(cls.most, cls.inside)
        time.sleep(0.05)
        with cls.lock:
            cls.inside -= 1
        return StepResult(data={"size": list(ctx.image.size)})


def _run(db_url: str, tmp_path: Path, settings: Settings, monkeypatch) -> tuple[int, list[object]]:
    monkeypatch.setitem(registry.STEP_REGISTRY, _Overlap.name, f"{__name__}:_Overlap")
    _Overlap.inside = _Overlap.most = 0
    refs = [photo(tmp_path / f"p{i}.png", (30 * i, 90, 200 - 20 * i)) for i in range(4)]
    out = apply(db_url, event(unique("L"), refs))
    with session_factory(db_url)() as session:
        outcomes = analyze_images(session, out.images_to_analyze, settings, max_attempts=3)
    assert [o.image_id for o in outcomes] == out.images_to_analyze
    with session_factory(db_url)() as session:
        hashes: list[object] = [session.get_one(m.Image, i).phash for i in out.images_to_analyze]
    return _Overlap.most, [o.status for o in outcomes] + hashes


def test_batching_runtime_computes_a_messages_images_at_once(db_url: str, tmp_path: Path, make_settings,
                                                            monkeypatch) -> None:
    steps = ["metadata", _Overlap.name]
    batched = make_settings(database_url=db_url, steps=steps, batch_max_size=4)
    most, batched_result = _run(db_url, tmp_path, batched, monkeypatch)
    assert most > 1
    one = make_settings(database_url=db_url, steps=steps, batch_max_size=1)
    most_one, one_result = _run(db_url, tmp_path, one, monkeypatch)
    assert most_one == 1
    assert batched_result == one_result and batched_result[:4] == ["done"] * 4


def test_concurrency_follows_the_batch_size(make_settings) -> None:
    assert analyze_module._concurrency(make_settings(batch_max_size=8), 3) == 3
    assert analyze_module._concurrency(make_settings(batch_max_size=2), 5) == 2
    assert analyze_module._concurrency(make_settings(batch_max_size=8), 1) == 1
    assert analyze_module._concurrency(make_settings(device="cpu"), 4) == 1
