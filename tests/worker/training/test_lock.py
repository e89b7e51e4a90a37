"""Exactly one retrain at a time: two retrains started together (threads, and two
`catalog retrain --now` processes on Postgres) run it once."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from db import models as m
from db.session import transaction
from tests.support.training import seed_catalogue
from worker.config import Settings
from worker.training import registry, retrain


def test_lock_is_exclusive_while_held(train_url: str, settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(train_url)
    with registry.retrain_lock(settings) as first:
        assert first.acquired
        assert retrain.run_retrain(settings, ["detector"]) is None  # the lock is held: nothing done
    with registry.retrain_lock(settings) as again:
        assert again.acquired  # released when the block ended


def test_two_threads_started_together_run_once(train_url: str, settings_for: Callable[..., Settings],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    seed_catalogue(train_url, per_class=12)
    settings = settings_for(train_url)
    real = retrain.train_category

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.5)  # keep the first run inside the lock while the second one starts
        return real(*args, **kwargs)

    monkeypatch.setattr(retrain, "train_category", slow)
    barrier = threading.Barrier(2)
    results: list[object] = []

    def go() -> None:
        barrier.wait()
        results.append(retrain.run_retrain(settings, ["category"]))

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(r is None for r in results) == [False, True]
    with transaction(train_url) as s:
        assert s.scalar(select(func.count()).select_from(m.TrainingRun)) == 1


@pytest.mark.slow
def test_two_cli_processes_on_postgres_run_once(tmp_path: Path) -> None:
    from db.migrate import upgrade
    from tests.support.services import PG_URL_BASE, create_pg_database, drop_pg_database

    name = create_pg_database("train_lock")
    url = f"{PG_URL_BASE}/{name}"
    try:
        upgrade(url)
        seed_catalogue(url, per_class=30)
        env = {**os.environ, "CATALOG_DATABASE_URL": url, "CATALOG_DATA_DIR": str(tmp_path / "data")}
        # Both processes import everything first, then start the retrain at the same instant
        # (a file barrier: each announces itself and waits for the other).
        ready = tmp_path / "ready"
        ready.mkdir()
        script = ("import os, time, pathlib; import worker.training.retrain; from worker.cli.main import main; "
                  f"d = pathlib.Path({str(ready)!r}); (d / str(os.getpid())).touch()\n"
                  "while len(list(d.iterdir())) < 2: time.sleep(0.005)\n"
                  "main()")
        cmd = [sys.executable, "-c", script, "retrain", "--now", "--what", "category"]
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(2)]
        outputs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs
        assert sum("another retrain is running" in o for o in outputs) == 1, outputs
        assert sum("promoted" in o for o in outputs) == 1, outputs
        with transaction(url) as s:
            assert s.scalar(select(func.count()).select_from(m.TrainingRun)) == 1
    finally:
        from db.session import dispose_engines

        dispose_engines()
        drop_pg_database(name)
