"""The task retry policy (tasks/base.py), driven through Celery's real retry machinery.

Each test plays the broker: it runs a task as a worker would for one delivery, catches the
retry message Celery tries to publish (its countdown and headers), advances a fake clock by the
countdown and delivers that message again, until the task stops retrying.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from celery import Celery
from celery.canvas import Signature
from celery.exceptions import Retry
from sqlalchemy.exc import IntegrityError, OperationalError

from tasks.base import DB_BACKOFF_MAX, OUTAGE_HEADER, DatabaseTask


def db_down() -> OperationalError:
    return OperationalError("SELECT 1", {}, ConnectionRefusedError("could not connect to server"))


@dataclass
class Broker:
    """Captures what Task.retry publishes instead of sending it."""

    sent: list[dict[str, Any]] = field(default_factory=list)
    now: float = 1_000_000.0

    def deliver(self, task: DatabaseTask, retries: int = 0, headers: dict[str, Any] | None = None,
                *args: Any) -> object:
        """Run one delivery of ``task``; return the Retry, the exception it failed with, or its result."""
        task.push_request(id="t-1", retries=retries, headers=headers, called_directly=False, is_eager=False,
                          args=list(args), kwargs={})
        try:
            return task(*args)  # as the worker does: __call__, then the autoretry-wrapped run
        except Retry as retry:
            return retry
        except (OperationalError, IntegrityError) as exc:  # it gave up: Celery re-raised the error
            return exc
        finally:
            task.pop_request()

    def run_until_given_up(self, task: DatabaseTask, limit: int = 10_000) -> list[float]:
        """Deliver, then redeliver every retry after its countdown; the countdowns in order."""
        countdowns: list[float] = []
        retries, headers = 0, None
        for _ in range(limit):
            outcome = self.deliver(task, retries, headers)
            if not isinstance(outcome, Retry):
                assert isinstance(outcome, OperationalError), outcome
                return countdowns
            options = self.sent[-1]
            countdowns.append(options["countdown"])
            self.now += options["countdown"]
            retries, headers = options["retries"], options["headers"]
        raise AssertionError(f"still retrying after {limit} deliveries")


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> Broker:
    fake = Broker()

    def capture(sig: Signature, *args: Any, **kwargs: Any) -> None:
        fake.sent.append(dict(sig.options))

    monkeypatch.setattr(Signature, "apply_async", capture)
    monkeypatch.setattr(time, "time", lambda: fake.now)
    return fake


@pytest.fixture
def make_task(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[..., Any]], DatabaseTask]:
    app = Celery("retry-policy-test", set_as_current=False)

    def _make(body: Callable[..., Any]) -> DatabaseTask:
        task: DatabaseTask = app.task(bind=True, base=DatabaseTask, name=f"test.{body.__name__}")(body)
        return task

    return _make


def always_down(self: DatabaseTask) -> None:
    raise db_down()


def test_tasks_use_celerys_own_backoff_with_jitter() -> None:
    from tasks.events import handle_event
    from tasks.images import analyze_image
    from tasks.maintenance import requeue_stale_images

    for task in (handle_event, analyze_image, requeue_stale_images):
        assert OperationalError in task.autoretry_for and IntegrityError in task.autoretry_for
        assert task.retry_backoff and task.retry_jitter
        assert task.retry_backoff_max == DB_BACKOFF_MAX


def test_an_unreachable_database_is_retried_with_growing_capped_delays_for_the_configured_time(
        broker: Broker, make_task: Callable[..., DatabaseTask], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_DB_RETRY_FOR", "600")
    # Full jitter draws each delay below its bound; take the bound itself to see the schedule.
    monkeypatch.setattr(random, "randrange", lambda stop: stop - 1)
    countdowns = broker.run_until_given_up(make_task(always_down))

    assert countdowns[:7] == [1, 2, 4, 8, 16, 32, 60]
    assert set(countdowns[6:]) == {DB_BACKOFF_MAX}
    # Not given up before the configured 600 s, and not much later either.
    waited = sum(countdowns)
    assert 600 <= waited < 600 + DB_BACKOFF_MAX
    # Far beyond the 5 retries the task allows for other reasons, and than the old ~7 s.
    assert len(countdowns) > 5 * 2


def test_jittered_delays_still_last_the_configured_time(
        broker: Broker, make_task: Callable[..., DatabaseTask], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_DB_RETRY_FOR", "900")
    random.seed(8)
    countdowns = broker.run_until_given_up(make_task(always_down))

    assert sum(countdowns) >= 900
    assert all(0 <= c <= min(DB_BACKOFF_MAX, 2 ** n) for n, c in enumerate(countdowns))
    assert len(set(countdowns[6:])) > 5  # jittered: workers do not come back in step


def test_db_retry_for_zero_gives_up_at_once(
        broker: Broker, make_task: Callable[..., DatabaseTask], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_DB_RETRY_FOR", "0")
    assert broker.run_until_given_up(make_task(always_down)) == []


def test_integrity_races_are_retried_a_bounded_number_of_times(
        broker: Broker, make_task: Callable[..., DatabaseTask]) -> None:
    def race(self: DatabaseTask) -> None:
        raise IntegrityError("INSERT", {}, Exception("duplicate key"))

    task = make_task(race)
    retries, headers, outcome = 0, None, None
    for _ in range(20):
        outcome = broker.deliver(task, retries, headers)
        if not isinstance(outcome, Retry):
            break
        retries, headers = broker.sent[-1]["retries"], broker.sent[-1]["headers"]
    assert isinstance(outcome, IntegrityError)
    assert retries == task.max_retries == 5


def test_an_outage_is_timed_from_its_first_failure_and_a_new_one_starts_afresh(
        broker: Broker, make_task: Callable[..., DatabaseTask], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_DB_RETRY_FOR", "100")
    task = make_task(always_down)
    # A stamp written for this delivery: the outage began 150 s ago, so the task gives up.
    old = {OUTAGE_HEADER: f"{broker.now - 150:.3f} 4 4"}
    assert isinstance(broker.deliver(task, 4, old), OperationalError)
    # The same stamp seen on a later delivery (a retry for another reason came in between):
    # this is a new outage, retried again, and the database retries keep being counted.
    outcome = broker.deliver(task, 6, old)
    assert isinstance(outcome, Retry)
    since, at, count = broker.sent[-1]["headers"][OUTAGE_HEADER].split()
    assert (float(since), int(at), int(count)) == (broker.now, 7, 5)


def test_database_retries_do_not_use_up_the_tasks_own_retry_budget(make_task: Callable[..., DatabaseTask]) -> None:
    seen: list[int] = []

    def probe(self: DatabaseTask) -> None:
        seen.append(self.work_retries)

    task = make_task(probe)
    broker = Broker()
    broker.deliver(task, 0, None)
    broker.deliver(task, 9, {OUTAGE_HEADER: "1.0 8 8"})  # 8 database retries, then 1 fetch retry
    assert seen == [0, 1]


def test_a_real_connection_failure_in_handle_event_is_retried(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.events import handle_event

    # Nothing listens on port 1: psycopg2 fails to connect at once, as during a Postgres restart.
    monkeypatch.setenv("CATALOG_DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1:1/none")
    event = {"event_id": "e-1", "type": "listing.created", "occurred_at": "2026-11-29T12:00:00Z",
             "listing": {"id": "L-1", "seller_id": "S-1", "images": []}}
    outcome = broker.deliver(handle_event, 0, None, event)
    assert isinstance(outcome, Retry), outcome
    assert OUTAGE_HEADER in broker.sent[-1]["headers"]
    assert broker.sent[-1]["retries"] == 1 and 0 <= broker.sent[-1]["countdown"] <= 1


@pytest.fixture(autouse=True)
def _forget_engines() -> Iterator[None]:
    yield
    from db.session import dispose_engines

    dispose_engines()


def test_the_outage_stamp_survives_a_trip_through_a_broker() -> None:
    """What a retry publishes reaches the next delivery's ``request.headers`` (real kombu
    transport in memory, the worker's own Request and Context)."""
    from celery.app.task import Context
    from celery.worker.request import Request

    app = Celery("header-trip", broker="memory://", set_as_current=False)
    app.conf.task_default_queue = "trip"
    task = app.task(bind=True, base=DatabaseTask, name="test.trip")(always_down)
    stamp = {OUTAGE_HEADER: "1000.000 3 2"}
    with app.connection_for_write() as conn:
        options: dict[str, Any] = {"retries": 3, "headers": stamp, "connection": conn}  # as retry() sends
        task.apply_async(**options)
        message = conn.SimpleQueue("trip").get(timeout=5)
        request = Context(Request(message, app=app, task=task).request_dict)
    assert request.retries == 3 and request.headers is not None
    assert request.headers[OUTAGE_HEADER] == "1000.000 3 2"
    task.push_request(retries=request.retries, headers=request.headers)
    try:
        assert task.work_retries == 1
    finally:
        task.pop_request()
