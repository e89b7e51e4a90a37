"""The reviewers' queue: atomic claims (Postgres SKIP LOCKED, SQLite guarded UPDATE), expiry,
verdicts recorded in flags and reviews, and clear errors for flags one does not hold."""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from db import models as m
from db.session import transaction
from tests.support.fraud import add_flags, throwaway_pg
from worker.cli.flags import flags as flags_cli
from worker.config import Settings
from worker.review import queue


@pytest.fixture
def settings(make_settings) -> Settings:
    return make_settings()


def test_claim_resolve_and_review_row(db_url: str, settings: Settings) -> None:
    with transaction(db_url) as s:
        ids = add_flags(s, 2, kind="fraud_queue_resolve_test")
    with transaction(db_url) as s:
        first = queue.claim_next_flag(s, "alice", 600, kind="fraud_queue_resolve_test")
    assert first is not None and first.id == ids[0] and first.claimed_by == "alice"
    with transaction(db_url) as s:
        second = queue.claim_next_flag(s, "bob", 600, kind="fraud_queue_resolve_test")
    assert second is not None and second.id == ids[1]

    with pytest.raises(queue.FlagNotHeld, match="claimed by alice"), transaction(db_url) as s:
        queue.resolve_flag(s, first.id, "bob", "confirmed", settings=settings)
    with transaction(db_url) as s:
        done = queue.resolve_flag(s, first.id, "alice", "confirmed", note="same photo, other shop", settings=settings)
    assert done.status == "confirmed" and done.reviewed_by == "alice" and done.reviewed_at
    with transaction(db_url) as s:
        review = s.execute(select(m.Review).where(m.Review.flag_id == first.id)).scalar_one()
        assert (review.reviewer, review.verdict, review.kind, review.note) == (
            "alice", "confirmed", "flag_verdict", "same photo, other shop")
        flag = s.get_one(m.Flag, first.id)
        assert flag.status == "confirmed" and flag.note == "same photo, other shop"
    with pytest.raises(queue.FlagNotHeld, match="already confirmed"), transaction(db_url) as s:
        queue.resolve_flag(s, first.id, "alice", "dismissed", settings=settings)
    with pytest.raises(queue.FlagNotFound), transaction(db_url) as s:
        queue.resolve_flag(s, 10**9, "alice", "dismissed", settings=settings)
    with pytest.raises(queue.FlagQueueError, match="verdict"), transaction(db_url) as s:
        queue.resolve_flag(s, second.id, "bob", "maybe", settings=settings)
    # Clean up what this test committed (the Postgres database is shared).
    with transaction(db_url) as s:
        for fid in ids:
            s.delete(s.get_one(m.Flag, fid))


def test_open_flag_must_be_claimed_first_and_expired_claims_return(db_url: str, settings: Settings) -> None:
    with transaction(db_url) as s:
        (fid,) = add_flags(s, 1, kind="fraud_queue_expiry_test")
    with pytest.raises(queue.FlagNotHeld, match="claim it first"), transaction(db_url) as s:
        queue.resolve_flag(s, fid, "alice", "dismissed", settings=settings)
    with transaction(db_url) as s:
        claimed = queue.claim_next_flag(s, "alice", timedelta(seconds=5), kind="fraud_queue_expiry_test")
    assert claimed is not None and claimed.id == fid
    with transaction(db_url) as s:
        assert queue.claim_next_flag(s, "bob", 60, kind="fraud_queue_expiry_test") is None
        # Let alice's claim expire (moving the clock is simpler than sleeping).
        s.get_one(m.Flag, fid).claim_expires_at = m.utcnow() - timedelta(seconds=1)
    with transaction(db_url) as s:
        again = queue.claim_next_flag(s, "bob", 60, kind="fraud_queue_expiry_test")
    assert again is not None and again.id == fid and again.claimed_by == "bob"
    with pytest.raises(queue.FlagNotHeld, match="claimed by bob"), transaction(db_url) as s:
        queue.resolve_flag(s, fid, "alice", "dismissed", settings=settings)
    with transaction(db_url) as s:
        queue.release_flag(s, fid, "bob")
        assert [f.id for f in queue.list_flags(s, status="open", kind="fraud_queue_expiry_test")] == [fid]
        s.delete(s.get_one(m.Flag, fid))


def test_expired_claim_cannot_be_resolved(db_url: str, settings: Settings) -> None:
    with transaction(db_url) as s:
        (fid,) = add_flags(s, 1, kind="fraud_queue_expired_resolve")
    with transaction(db_url) as s:
        queue.claim_next_flag(s, "alice", 60, kind="fraud_queue_expired_resolve")
        s.get_one(m.Flag, fid).claim_expires_at = m.utcnow() - timedelta(seconds=1)
    with pytest.raises(queue.FlagNotHeld, match="expired"), transaction(db_url) as s:
        queue.resolve_flag(s, fid, "alice", "confirmed", settings=settings)
    with transaction(db_url) as s:
        s.delete(s.get_one(m.Flag, fid))


@pytest.mark.postgres
def test_twenty_reviewers_claim_one_hundred_distinct_flags() -> None:
    with throwaway_pg("fraud_queue") as url:
        engine = create_engine(url, poolclass=NullPool)  # one connection per reviewer
        with Session(engine) as s, s.begin():
            ids = add_flags(s, 100)
        barrier = threading.Barrier(20)
        claimed: dict[str, list[int]] = {}
        errors: list[BaseException] = []

        def reviewer(name: str) -> None:
            got: list[int] = []
            try:
                barrier.wait()
                while True:
                    with Session(engine) as s, s.begin():
                        flag = queue.claim_next_flag(s, name, 600)
                    if flag is None:
                        break
                    got.append(flag.id)
            except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
                errors.append(exc)
            claimed[name] = got

        threads = [threading.Thread(target=reviewer, args=(f"r{i}",)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        engine.dispose()
        assert not errors
        all_ids = [fid for got in claimed.values() for fid in got]
        assert len(all_ids) == 100
        assert sorted(all_ids) == sorted(ids)
        assert sum(1 for got in claimed.values() if got) > 1  # the work was shared


def test_cli_list_claim_resolve(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from db.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'flags.db'}"
    upgrade(url)
    monkeypatch.setenv("CATALOG_DATABASE_URL", url)
    with transaction(url) as s:
        (fid,) = add_flags(s, 1, kind="contact_info")
    runner = CliRunner()
    out = runner.invoke(flags_cli, ["list", "--status", "open", "--json"])
    assert out.exit_code == 0, out.output
    assert [f["id"] for f in json.loads(out.output)] == [fid]
    out = runner.invoke(flags_cli, ["claim", "--reviewer", "alice", "--ttl", "60", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["id"] == fid
    out = runner.invoke(flags_cli, ["resolve", str(fid), "--reviewer", "bob", "--verdict", "confirmed"])
    assert out.exit_code != 0 and "claimed by alice" in out.output
    out = runner.invoke(flags_cli, ["resolve", str(fid), "--reviewer", "alice", "--verdict", "dismissed",
                                    "--note", "a printed phone number of the manufacturer"])
    assert out.exit_code == 0, out.output
    out = runner.invoke(flags_cli, ["list", "--kind", "contact_info"])
    assert "dismissed by alice" in out.output
    out = runner.invoke(flags_cli, ["claim", "--reviewer", "alice"])
    assert "queue is empty" in out.output


def test_most_serious_flag_is_claimed_first_when_weights_are_given(db_url: str) -> None:
    from db import models as m
    from db.session import session_factory
    from tests.support.services import unique
    from worker.review import queue

    factory = session_factory(db_url)
    tag = unique("prio")
    with factory() as s, s.begin():
        listing = m.Listing(external_id=tag, seller_id="s", title="", status="done")
        s.add(listing)
        s.flush()
        for kind, score in ((f"{tag}-weak", 0.9), (f"{tag}-strong", 0.8), (f"{tag}-weak", 0.2)):
            s.add(m.Flag(listing_id=listing.id, kind=kind, score=score, evidence={}))
    weights = {f"{tag}-weak": 0.1, f"{tag}-strong": 0.7}
    order = []
    with factory() as s, s.begin():
        for _ in range(3):
            flag = queue.claim_next_flag(s, "alice", 60, weights=weights)
            assert flag is not None
            order.append((flag.kind, flag.score))
    assert order == [(f"{tag}-strong", 0.8), (f"{tag}-weak", 0.9), (f"{tag}-weak", 0.2)]


def test_verdict_updates_the_listing_fraud_score(db_url: str, make_settings) -> None:
    from db import models as m
    from db.session import session_factory
    from tests.support.services import unique
    from worker.pipeline.store import update_fraud_score
    from worker.review import queue

    settings = make_settings(database_url=db_url)
    factory = session_factory(db_url)
    kind = unique("verdict")
    with factory() as s, s.begin():
        listing = m.Listing(external_id=unique("L"), seller_id="s", title="", status="done")
        s.add(listing)
        s.flush()
        s.add(m.Flag(listing_id=listing.id, kind="duplicate_image", score=1.0, evidence={}))
        s.add(m.Flag(listing_id=listing.id, kind=kind, score=1.0, evidence={}))
        update_fraud_score(s, listing, settings)
        listing_id = listing.id
    with factory() as s, s.begin():
        assert s.get_one(m.Listing, listing_id).fraud_decision == "review"
        flag = s.query(m.Flag).filter_by(listing_id=listing_id, kind="duplicate_image").one()
        flag.status, flag.claimed_by = "claimed", "alice"
        flag.claim_expires_at = m.utcnow() + timedelta(minutes=5)
    with factory() as s, s.begin():
        queue.resolve_flag(s, flag.id, "alice", "dismissed", "own photo, licensed", settings=settings)
    with factory() as s:
        listing = s.get_one(m.Listing, listing_id)
        assert listing.fraud_score is not None and listing.fraud_score < 0.5 and listing.fraud_decision == "ok"
