"""The retrain task: registered on the `train` queue, scheduled by beat from
CATALOG_RETRAIN_SCHEDULE, and running the same code as `catalog retrain --now`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from celery.schedules import crontab

from db.migrate import upgrade
from db.session import dispose_engines
from worker.celery_app import RETRAIN_TASK, app, retrain_schedule
from worker.config import Settings, get_settings, reset_settings


def test_task_is_registered_and_routed_to_the_train_queue() -> None:
    from worker.training.retrain import BACKFILL_TASK

    app.loader.import_default_modules()
    for name in (RETRAIN_TASK, BACKFILL_TASK):
        assert name in app.tasks
        assert app.amqp.router.route({}, name)["queue"].name == "train"


def test_beat_schedule_default_nightly_configurable_or_off(make_settings: Callable[..., Settings]) -> None:
    entry = retrain_schedule(make_settings())["retrain"]
    assert entry["task"] == RETRAIN_TASK
    assert entry["schedule"] == crontab(minute="0", hour="3")
    weekly = retrain_schedule(make_settings(retrain_schedule="30 2 * * sun"))["retrain"]["schedule"]
    assert weekly == crontab(minute="30", hour="2", day_of_week="sun")
    assert retrain_schedule(make_settings(retrain_schedule=" ")) == {}
    with pytest.raises(ValueError, match="5 crontab fields"):
        retrain_schedule(make_settings(retrain_schedule="0 3 * *"))
    assert "retrain" in app.conf.beat_schedule


def test_task_runs_the_retrain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.training import retrain

    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    upgrade(url)
    monkeypatch.setenv("CATALOG_DATABASE_URL", url)
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path / "data"))
    reset_settings()
    assert get_settings().effective_database_url == url
    try:
        result = retrain.apply(kwargs={"what": ["category", "detector"]}).get()
    finally:
        dispose_engines()
    assert [r["decision"] for r in result] == ["skipped", "skipped"]
    assert result[0]["reason"] == "skipped: no reviewed category labels"


def test_backfill_task_runs_the_backfill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.training import backfill

    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    upgrade(url)
    monkeypatch.setenv("CATALOG_DATABASE_URL", url)
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path / "data"))
    reset_settings()
    try:
        result = backfill.apply(kwargs={"model": "fraud-scorer", "limit": 5}).get()
    finally:
        dispose_engines()
    assert result["done"] == 0 and result["step"] is None
    assert str(result["target"]).startswith("fixed weights")
