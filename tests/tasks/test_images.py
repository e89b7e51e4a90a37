"""The analyse task names its message in the image's lease (issue 12, items 7 and 8): a
duplicate message skips an image another message is analysing, a redelivery of the message
whose run died takes the image over (and that death counts), a fetch retry gives the lease
back; the housekeeping task and every worker's own sweeper re-announce expired leases."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from celery.canvas import Signature
from celery.exceptions import Retry
from celery.signals import worker_ready, worker_shutdown
from sqlalchemy import update

from db import models as m
from db.migrate import upgrade
from db.session import dispose_engines, session_factory
from tasks.base import DatabaseTask
from tests.support.pipeline import apply, event, photo
from tests.support.services import unique
from worker.config import get_settings
from worker.pipeline.analyze import Claim, claim_image
from worker.pipeline.lease import Holder


def deliver(task: DatabaseTask, task_id: str, retries: int, *args: Any) -> object:
    """One delivery of ``task`` as a worker runs it (its request carries the message's id)."""
    task.push_request(id=task_id, retries=retries, headers=None, called_directly=False, is_eager=False,
                      args=list(args), kwargs={})
    try:
        return task(*args)
    except Retry as retry:
        return retry
    finally:
        task.pop_request()


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    upgrade(url)
    for key, value in {"DATABASE_URL": url, "DATA_DIR": str(tmp_path / "data"), "STEPS": "metadata",
                       "FETCH_ALLOW_DIRS": str(tmp_path), "FETCH_ALLOW_HOSTS": "127.0.0.1",
                       "FETCH_RETRY_DELAY": "0"}.items():
        monkeypatch.setenv(f"CATALOG_{key}", value)
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(Signature, "apply_async", lambda sig, *a, **k: sent.append(dict(sig.options)))
    yield url
    dispose_engines()


def _image(url: str, image_id: int) -> m.Image:
    with session_factory(url)() as session:
        return session.get_one(m.Image, image_id)


def test_the_task_holds_the_lease_as_its_message(db: str, tmp_path: Path) -> None:
    from tasks.images import analyze_image

    (image_id,) = apply(db, event(unique("L"), [photo(tmp_path / "a.png")])).images_to_analyze
    with session_factory(db)() as session:  # message t-1 started, then its worker was killed
        assert isinstance(claim_image(session, image_id, get_settings(), Holder("t-1", 0), 3), Claim)

    assert deliver(analyze_image, "t-2", 0, image_id) == "skipped"  # a duplicate message: hands off
    assert _image(db, image_id).attempts == 1
    assert deliver(analyze_image, "t-1", 0, image_id) == "done"  # t-1 delivered again: takes over
    image = _image(db, image_id)
    assert (image.status, image.attempts, image.lease_owner) == ("done", 2, None)


def test_a_fetch_retry_gives_the_lease_back(db: str) -> None:
    from tasks.images import analyze_image

    (image_id,) = apply(db, event(unique("L"), ["http://127.0.0.1:9/closed.jpg"])).images_to_analyze
    assert isinstance(deliver(analyze_image, "t-9", 0, image_id), Retry)
    image = _image(db, image_id)
    assert (image.status, image.attempts, image.lease_owner, image.lease_expires_at) == ("pending", 1, None, None)


def test_the_batch_task_sends_a_retried_image_on_alone(db: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.images import analyze_image, analyze_images

    ids = apply(db, event(unique("L"), [photo(tmp_path / "a.png"), "http://127.0.0.1:9/closed.jpg"])).images_to_analyze
    sent: list[tuple[Any, ...]] = []
    monkeypatch.setattr(analyze_image, "apply_async", lambda *a, **k: sent.append((a, k)))
    assert deliver(analyze_images, "t-b", 0, ids) == {"done": 1, "retry": 1}
    # As analyze_image's own first retry: the same fetch budget, the lease given back.
    assert sent == [(((ids[1],), {"event_id": None}), {"countdown": 0, "retries": 1})]
    good, retried = _image(db, ids[0]), _image(db, ids[1])
    assert (good.status, good.attempts, good.lease_owner) == ("done", 1, None)
    assert (retried.status, retried.attempts, retried.lease_owner) == ("pending", 1, None)
    # The redelivered batch message finds the done image done and leaves the handed-back one
    # to its own message (claims it like any pending image: idempotent either way).
    assert deliver(analyze_images, "t-b", 0, ids[:1]) == {"skipped": 1}


def test_housekeeping_reannounces_expired_leases(db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks import maintenance

    (image_id,) = apply(db, event(unique("L"), [photo(tmp_path / "a.png")])).images_to_analyze
    with session_factory(db)() as session:
        claim_image(session, image_id, get_settings(), Holder("killed", 0), 3)
    with session_factory(db)() as session, session.begin():
        session.execute(update(m.Image).values(lease_expires_at=m.utcnow() - timedelta(seconds=1)))
    announced: list[int] = []
    from tasks.images import analyze_image

    monkeypatch.setattr(analyze_image, "delay", announced.append)
    assert deliver(maintenance.requeue_stale_images, "h-1", 0) == 1
    assert announced == [image_id]


class _FakeSweeper:
    instances: list[_FakeSweeper] = []

    def __init__(self, settings: object, announce: object) -> None:
        self.settings, self.announce, self.running = settings, announce, False
        _FakeSweeper.instances.append(self)

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False


def test_every_worker_starts_its_own_sweeper_and_stops_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks import maintenance

    monkeypatch.setattr(maintenance, "Sweeper", _FakeSweeper)
    monkeypatch.setattr(maintenance, "_sweeper", None)
    worker_ready.send(sender=None)
    worker_ready.send(sender=None)  # once per worker process
    (sweeper,) = _FakeSweeper.instances
    assert sweeper.running and sweeper.settings is get_settings()
    worker_shutdown.send(sender=None)
    assert not sweeper.running and maintenance._sweeper is None
