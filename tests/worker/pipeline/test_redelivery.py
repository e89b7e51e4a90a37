"""The same event delivered several times while its images are being analysed (issue 12,
item 7): nothing in flight is announced again, a duplicate message for an image in flight does
not count as an attempt, nobody is failed with a made-up reason, and every transaction that
locks rows locks the listing before its images."""

from __future__ import annotations

import re
import threading
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sqlalchemy import Engine
from sqlalchemy import event as sa_event
from sqlalchemy.orm import sessionmaker

from db import models as m
from db.session import get_engine, make_engine, session_factory
from tests.support.pipeline import analyze_all, apply, event, photo
from tests.support.services import unique
from worker.config import Settings
from worker.pipeline import registry
from worker.pipeline.analyze import ImageOutcome, analyze_image
from worker.pipeline.contract import ImageContext, StepResult


class _GateStep:
    """A slow model: every run waits until the test opens the gate."""

    name: ClassVar[str] = "gate"
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()
        self.runs = 0

    def version(self, settings: Settings) -> str:
        return "gate@1"

    def run(self, ctx: ImageContext) -> StepResult:
        self.runs += 1
        self.entered.set()
        assert self.open.wait(60), "the test never opened the gate"
        return StepResult(data={"gate": True})


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[_GateStep]:
    step = _GateStep()
    monkeypatch.setitem(registry.STEP_REGISTRY, step.name, f"{__name__}:_GateStep")
    monkeypatch.setitem(registry._instances, step.name, step)
    yield step
    step.open.set()


def _analyze_in_thread(url: str, settings: Settings, image_id: int, out: list[ImageOutcome]) -> threading.Thread:
    def work() -> None:
        with session_factory(url)() as session:
            out.append(analyze_image(session, image_id, settings, max_attempts=3))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_four_deliveries_of_one_event_fail_nothing_and_count_one_attempt(
        db_url: str, tmp_path: Path, make_settings, gate: _GateStep) -> None:
    settings = make_settings(database_url=db_url, steps=["metadata", "gate"])
    payload = event(unique("L"), [photo(tmp_path / "a.png"), photo(tmp_path / "b.png", (0, 99, 0))])
    first = apply(db_url, payload)
    in_flight, queued = first.images_to_analyze
    outcomes: list[ImageOutcome] = []
    threads = [_analyze_in_thread(db_url, settings, in_flight, outcomes)]
    assert gate.entered.wait(30)

    # Three more deliveries while the first image is being analysed; whatever they announce
    # runs at once (four back-to-back deliveries, as in the report).
    redeliveries = [apply(db_url, payload) for _ in range(3)]
    assert [r.outcome for r in redeliveries] == ["duplicate"] * 3
    assert all(in_flight not in r.images_to_analyze for r in redeliveries)
    # An image not started yet is announced again: its message may have been lost.
    assert all(r.images_to_analyze == [queued] for r in redeliveries)
    # Even a duplicate message that does arrive for the image in flight (announced before it
    # started) neither runs it a second time nor counts as an attempt.
    for _ in range(3):
        threads.append(_analyze_in_thread(db_url, settings, in_flight, outcomes))
    for thread in threads[1:]:
        thread.join(10)
    assert sorted(o.status for o in outcomes) == ["skipped"] * 3
    assert gate.runs == 1

    gate.open.set()
    threads[0].join(30)
    assert sorted(o.status for o in outcomes) == ["done", "skipped", "skipped", "skipped"]
    analyze_all(db_url, settings, [queued])
    with session_factory(db_url)() as session:
        image = session.get_one(m.Image, in_flight)
        assert (image.status, image.error, image.attempts) == ("done", None, 1)
        assert image.lease_owner is None and image.lease_expires_at is None
        listing = session.get_one(m.Listing, first.listing_id)
        assert listing.status == "done" and listing.fraud_decision == "ok"


# --- one lock order everywhere: the listing row, then its images --------------------------------

_LOCKS_LISTING = re.compile(r"^(SELECT .* FROM listings .*FOR UPDATE|UPDATE listings )", re.S)
_LOCKS_IMAGE = re.compile(r"^(SELECT .* FROM images .*FOR UPDATE|UPDATE images |DELETE FROM images )", re.S)


class _LockRecorder:
    """Records, per database transaction, the statements that lock listing or image rows."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.current: dict[int, list[str]] = defaultdict(list)
        self.transactions: list[list[str]] = []
        sa_event.listen(engine, "before_cursor_execute", self._statement)
        sa_event.listen(engine, "commit", self._end)
        sa_event.listen(engine, "rollback", self._end)

    def _statement(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        text = " ".join(statement.split())
        if _LOCKS_LISTING.match(text):
            self.current[id(conn)].append("listing")
        elif _LOCKS_IMAGE.match(text):
            self.current[id(conn)].append("image")

    def _end(self, conn: Any) -> None:
        kinds = self.current.pop(id(conn), [])
        if kinds:
            self.transactions.append(kinds)

    def close(self) -> None:
        sa_event.remove(self.engine, "before_cursor_execute", self._statement)
        sa_event.remove(self.engine, "commit", self._end)
        sa_event.remove(self.engine, "rollback", self._end)


@pytest.mark.postgres
def test_every_transaction_locks_the_listing_before_its_images(pg_url: str, tmp_path: Path, make_settings) -> None:
    """Deadlocks come from two transactions taking the same two locks in opposite orders; here
    every path that locks an image row (apply an event, claim, store, fail, give up, the
    sweeps, delete) must already hold its listing's lock."""
    from worker.pipeline.sweep import requeue_expired_leases, stale_images

    settings = make_settings(database_url=pg_url)
    recorder = _LockRecorder(get_engine(pg_url))
    factory = session_factory(pg_url)
    setup_engine = make_engine(pg_url)  # the test's own edits are not recorded
    setup = sessionmaker(setup_engine)
    try:
        listing = unique("L")
        out = apply(pg_url, event(listing, [photo(tmp_path / "a.png"), str(tmp_path / "missing.jpg"),
                                            photo(tmp_path / "c.png", (1, 2, 3))]))
        good, missing, dying = out.images_to_analyze
        analyze_all(pg_url, settings, [good, missing])                    # claim, store, fail
        apply(pg_url, event(listing, [photo(tmp_path / "a.png"), photo(tmp_path / "c.png", (1, 2, 3))],
                            etype="listing.updated"))                     # re-sync, keep previous
        analyze_all(pg_url, settings, [good])
        with setup() as session, session.begin():                        # a run that died
            image = session.get_one(m.Image, dying)
            image.attempts, image.lease_owner = 3, "dead-task#0/abc"
            image.lease_expires_at = m.utcnow() - timedelta(minutes=1)
        with factory() as session, session.begin():
            assert requeue_expired_leases(session) == [dying]
        with setup() as session, session.begin():
            session.get_one(m.Image, dying).updated_at = m.utcnow() - timedelta(hours=1)
        with factory() as session, session.begin():
            assert stale_images(session, timedelta(minutes=15)) == [dying]
        analyze_all(pg_url, settings, [dying])                            # gave up
        apply(pg_url, event(listing, [], etype="listing.deleted"))
    finally:
        recorder.close()
        setup_engine.dispose()
    with_images = [kinds for kinds in recorder.transactions if "image" in kinds]
    assert len(with_images) >= 8
    wrong = [kinds for kinds in with_images if kinds[0] != "listing"]
    assert wrong == []
    with factory() as session:
        assert (session.get_one(m.Image, dying).error or "").startswith("gave_up: ")
