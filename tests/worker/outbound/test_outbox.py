"""listing.processed goes into the outbox in the transaction that finishes (or re-scores) the
listing, once per completion, valid against the published schema; the relay puts it on the
results stream (issue 13, item 8)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from db import models as m
from db.session import dispose_engines, session_factory, transaction
from tests.support.pipeline import analyze_all, apply, event, photo
from tests.support.services import REDIS_URL, TrackingRedis, unique
from worker.config import get_settings, load_settings
from worker.outbound.outbox import build_listing_processed, failure_code
from worker.outbound.publish import relay
from worker.outbound.schema import SchemaError, results_schema, validate_payload

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def env(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_client: TrackingRedis) -> Iterator[dict]:
    """Settings (in the environment, as a worker reads them) with a results stream of its own."""
    stream = unique("results")
    for key, value in {"DATABASE_URL": db_url, "DATA_DIR": str(tmp_path / "data"), "STEPS": "metadata,quality",
                       "FETCH_ALLOW_DIRS": str(tmp_path), "RESULTS_REDIS_URL": REDIS_URL,
                       "RESULTS_STREAM": stream}.items():
        monkeypatch.setenv(f"CATALOG_{key}", value)
    yield {"url": db_url, "stream": stream, "redis": redis_client, "tmp": tmp_path}
    dispose_engines()


def outbox_rows(url: str, external_id: str) -> list[m.OutboxEvent]:
    with session_factory(url)() as session:
        return list(session.scalars(select(m.OutboxEvent).where(m.OutboxEvent.listing_external_id == external_id)
                                    .order_by(m.OutboxEvent.id)))


def finish(env: dict, listing: str, refs: list[str], **kwargs: object) -> dict:
    payload = event(listing, refs, **kwargs)  # type: ignore[arg-type]
    outcome = apply(env["url"], payload)
    analyze_all(env["url"], get_settings(), outcome.images_to_analyze)
    return payload


def test_finishing_a_listing_records_one_valid_event_and_relay_publishes_it(env: dict) -> None:
    tmp, listing = env["tmp"], unique("L")
    refs = [photo(tmp / "a.png"), str(tmp / "missing.png")]
    payload = finish(env, listing, refs)

    (row,) = outbox_rows(env["url"], listing)
    assert row.reason == "processed" and row.published_at is None and row.webhook_status is None
    body = row.payload
    validate_payload(body)
    assert body["listing"]["id"] == listing and body["source_event_id"] == payload["event_id"]
    assert [(img["status"], img["failure_code"]) for img in body["images"]] == [("done", None), ("failed", "not_found")]
    assert body["decision"] in ("review", "hold", "incomplete")  # a failed image is never vouched for
    assert {flag["kind"] for flag in body["flags"]} == {"low_quality"}  # 64x48 px
    assert set(body["model_versions"]) == {"metadata", "quality"}

    # The same event again, and the finished images analysed again (a duplicated message):
    # nothing new is recorded for the same completion.
    outcome = apply(env["url"], payload)
    analyze_all(env["url"], get_settings(), [img["id"] for img in body["images"]])
    assert outcome.images_to_analyze == [] and len(outbox_rows(env["url"], listing)) == 1

    report = relay(get_settings())
    assert report.published >= 1 and report.error is None
    (row,) = outbox_rows(env["url"], listing)
    assert row.published_at is not None and row.stream_id
    entries = env["redis"].xrange(env["stream"])
    mine = [fields for _id, fields in entries if fields[b"event_id"].decode() == row.event_id]
    assert len(mine) == 1 and json.loads(mine[0][b"event"]) == body
    relay(get_settings())  # a published row is never published again by the relay
    again = [f for _id, f in env["redis"].xrange(env["stream"]) if f[b"event_id"] == mine[0][b"event_id"]]
    assert len(again) == 1


def test_a_new_event_is_a_new_completion(env: dict) -> None:
    listing = unique("L")
    finish(env, listing, [photo(env["tmp"] / "a.png")])
    finish(env, listing, [photo(env["tmp"] / "b.png", colour=(10, 200, 10))], etype="listing.updated")
    rows = outbox_rows(env["url"], listing)
    assert [r.reason for r in rows] == ["processed", "processed"]
    assert rows[0].event_id != rows[1].event_id


def test_a_listing_left_with_nothing_to_analyse_is_announced(env: dict) -> None:
    listing = unique("L")
    finish(env, listing, [])
    (row,) = outbox_rows(env["url"], listing)
    assert row.payload["images"] == [] and row.payload["listing"]["status"] == "done"


def test_review_verdict_records_a_rescored_event(env: dict) -> None:
    from worker.review import queue

    listing = unique("L")
    finish(env, listing, [photo(env["tmp"] / "a.png")])
    with transaction(env["url"]) as session:
        flag_id = session.scalar(select(m.Flag.id).join(m.Listing).where(m.Listing.external_id == listing))
    assert flag_id is not None
    with transaction(env["url"]) as session:
        queue.claim_flag(session, flag_id, "alice")
    with transaction(env["url"]) as session:
        queue.resolve_flag(session, flag_id, "alice", "dismissed", settings=get_settings())
    rows = outbox_rows(env["url"], listing)
    assert [r.reason for r in rows] == ["processed", "rescored"]
    validate_payload(rows[1].payload)
    assert [f["status"] for f in rows[1].payload["flags"]] == ["dismissed"]
    assert rows[1].payload["decision"] == "ok"


def test_backfill_rescore_records_an_event_only_when_the_score_changed(env: dict, monkeypatch: pytest.MonkeyPatch
                                                                       ) -> None:
    from worker.training.backfill import rescore

    listing = unique("L")
    finish(env, listing, [photo(env["tmp"] / "a.png")])
    with transaction(env["url"]) as session:
        listing_id = session.scalar(select(m.Listing.id).where(m.Listing.external_id == listing))
    assert listing_id is not None
    rescore(get_settings(), listing_id)  # same weights: same score, nothing to tell
    assert [r.reason for r in outbox_rows(env["url"], listing)] == ["processed"]
    rescore(load_settings(fraud_weights={"low_quality": 0.0}), listing_id)
    assert [r.reason for r in outbox_rows(env["url"], listing)] == ["processed", "rescored"]


def test_nothing_is_recorded_without_a_results_stream_or_webhook(db_url: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded broker alone: local runs never need Redis, and write no outbox rows."""
    for key, value in {"DATABASE_URL": db_url, "DATA_DIR": str(tmp_path / "data"), "STEPS": "metadata",
                       "FETCH_ALLOW_DIRS": str(tmp_path)}.items():
        monkeypatch.setenv(f"CATALOG_{key}", value)
    assert get_settings().effective_results_redis_url is None
    listing = unique("L")
    outcome = apply(db_url, event(listing, [photo(tmp_path / "a.png")]))
    analyze_all(db_url, get_settings(), outcome.images_to_analyze)
    assert outbox_rows(db_url, listing) == []
    dispose_engines()


def test_results_stream_defaults(tmp_path: Path) -> None:
    base = {"data_dir": tmp_path}
    assert load_settings(**base).effective_results_redis_url is None
    assert load_settings(**base, redis_url="redis://r:6379/1").effective_results_redis_url is None
    assert load_settings(**base, broker_url="redis://b:6379/0").effective_results_redis_url == "redis://b:6379/0"
    assert load_settings(**base, broker_url="redis://b:6379/0", redis_url="redis://r:6379/1"
                         ).effective_results_redis_url == "redis://r:6379/1"
    assert load_settings(**base, broker_url="redis://b:6379/0", results_redis_url="off"
                         ).effective_results_redis_url is None
    assert load_settings(**base, results_redis_url="redis://x:6379/3").effective_results_redis_url == "redis://x:6379/3"


def test_a_payload_that_breaks_the_schema_is_refused_at_the_source(db_url: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_DATABASE_URL", db_url)
    listing = unique("L")
    apply(db_url, event(listing, []))
    with transaction(db_url) as session:
        row = session.scalars(select(m.Listing).where(m.Listing.external_id == listing)).one()
        row.fraud_decision = "maybe"  # a bug somewhere upstream
        with pytest.raises(SchemaError, match="decision"):
            build_listing_processed(session, row, "processed")
        with pytest.raises(ValueError, match="reason"):
            build_listing_processed(session, row, "because")
        session.rollback()
    dispose_engines()


def test_failure_code() -> None:
    assert failure_code("not_found: no such file") == "not_found"
    assert failure_code(None) is None and failure_code("odd") is None


def test_published_schema_file_is_the_code_and_the_cli_prints_both() -> None:
    from worker.cli.main import main
    from worker.intake.events import json_schema

    assert json.loads((ROOT / "docs" / "results.schema.json").read_text()) == results_schema(), \
        "regenerate with `catalog events-schema --results > docs/results.schema.json`"
    runner = CliRunner()
    default = runner.invoke(main, ["events-schema"])
    assert default.exit_code == 0 and json.loads(default.output) == json_schema()  # unchanged
    results = runner.invoke(main, ["events-schema", "--results"])
    assert results.exit_code == 0 and json.loads(results.output) == results_schema()
    assert "--results" in runner.invoke(main, ["events-schema", "--help"]).output


def _reference_payload(session, listing: m.Listing, reason: str, event_id: str) -> dict:
    """The payload as the builder made it before it read plain rows (ORM objects, four
    SELECTs of its own): the new builder must produce the same bytes for the same state."""
    from worker.outbound.outbox import iso
    from worker.outbound.schema import EVENT_TYPE, SCHEMA_VERSION

    session.flush()
    images = session.scalars(select(m.Image).where(m.Image.listing_id == listing.id)
                             .order_by(m.Image.position, m.Image.id)).all()
    tags = session.scalars(select(m.Tag).where(m.Tag.listing_id == listing.id).order_by(m.Tag.id)).all()
    flags = session.scalars(select(m.Flag).where(m.Flag.listing_id == listing.id).order_by(m.Flag.id)).all()
    runs = session.execute(
        select(m.StepRunRecord.step, m.StepRunRecord.model_version).distinct()
        .join(m.Image, m.Image.id == m.StepRunRecord.image_id).where(m.Image.listing_id == listing.id)).all()
    versions: dict[str, list[str]] = {}
    for step, version in runs:
        versions.setdefault(step, []).append(version)
    return {
        "schema_version": SCHEMA_VERSION, "event_id": event_id, "type": EVENT_TYPE, "reason": reason,
        "occurred_at": iso(m.utcnow()), "source_event_id": listing.last_event_id,
        "listing": {"id": listing.external_id, "internal_id": listing.id, "seller_id": listing.seller_id,
                    "category": listing.category, "status": listing.status},
        "processed_at": iso(listing.processed_at), "decision": listing.fraud_decision,
        "fraud_score": listing.fraud_score,
        "images": [{"id": i.id, "position": i.position, "url": i.url, "status": i.status, "complete": i.complete,
                    "failure_code": failure_code(i.error) if i.status == "failed" else None,
                    "error": i.error if i.status == "failed" else None} for i in images],
        "tags": [{"name": t.name, "score": t.score, "source": t.source, "image_id": t.image_id,
                  "model_version": t.model_version} for t in tags],
        "flags": [{"id": f.id, "kind": f.kind, "score": f.score, "status": f.status, "image_id": f.image_id,
                   "model_version": f.model_version} for f in flags],
        "model_versions": {step: sorted(found) for step, found in sorted(versions.items())},
    }


def test_payload_bytes_are_those_of_the_orm_builder(env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The builder reads plain rows (once per finish, shared with the fraud score): for the same
    state it encodes exactly the bytes the ORM-object builder did -- failed and done images,
    several flags (one reviewed, so not in insertion order), tags, model versions, both reasons."""
    from datetime import UTC, datetime

    from worker.outbound.outbox import encode, listing_flags, listing_images

    tmp, listing = env["tmp"], unique("L")
    finish(env, listing, [photo(tmp / "b.png", colour=(0, 90, 0)), photo(tmp / "a.png"), str(tmp / "missing.png")])
    fixed = datetime(2026, 11, 30, 6, 0, 0, 123456, tzinfo=UTC)
    monkeypatch.setattr(m, "utcnow", lambda: fixed)
    with transaction(env["url"]) as session:
        row = session.scalars(select(m.Listing).where(m.Listing.external_id == listing)).one()
        flag_ids = sorted(session.scalars(select(m.Flag.id).where(m.Flag.listing_id == row.id)))
        assert len(flag_ids) >= 2
        session.add(m.Tag(listing_id=row.id, image_id=None, name="zz", score=0.25, source="category",
                          model_version="head@1"))
        session.add(m.Tag(listing_id=row.id, image_id=None, name="aa", score=1 / 3, source="category",
                          model_version="head@1"))
        session.get_one(m.Flag, flag_ids[0]).status = "confirmed"  # an UPDATE moves the row on Postgres
        session.flush()
        for reason in ("processed", "rescored"):
            new = build_listing_processed(session, row, reason, "0b7c8c8e-5b1e-4a59-9d43-6f0f2f1c1e11")
            old = _reference_payload(session, row, reason, "0b7c8c8e-5b1e-4a59-9d43-6f0f2f1c1e11")
            assert encode(new) == encode(old)
            again = build_listing_processed(session, row, reason, "0b7c8c8e-5b1e-4a59-9d43-6f0f2f1c1e11",
                                            images=listing_images(session, row.id),
                                            flags=listing_flags(session, row.id))
            assert encode(again) == encode(old)
        assert [f["id"] for f in new["flags"]] == flag_ids and len(new["tags"]) >= 2
        assert [i["status"] for i in new["images"]] == ["done", "done", "failed"]
        session.rollback()


def test_fraud_score_and_decision_from_rows_are_those_from_orm_flags(env: dict) -> None:
    """The finish scores the flag rows it read once for the payload: the same score, decision
    and contributions as the ORM flags it used to load, whatever the flags' kinds and verdicts;
    ``incomplete`` from the image rows as from the SQL count."""
    from worker.fraud.champion import champion_fraud_score
    from worker.outbound.outbox import listing_flags, listing_images
    from worker.pipeline.store import unanalysed_images, update_fraud_score

    tmp, listing = env["tmp"], unique("L")
    finish(env, listing, [photo(tmp / "a.png"), photo(tmp / "b.png", colour=(0, 90, 0))])
    settings = get_settings()
    with transaction(env["url"]) as session:
        row = session.scalars(select(m.Listing).where(m.Listing.external_id == listing)).one()
        image_ids = sorted(session.scalars(select(m.Image.id).where(m.Image.listing_id == row.id)))
        for kind, score, status in (("contact_info", 0.9, "open"), ("contact_info", 0.4, "dismissed"),
                                    ("stolen_photo", 0.3, "confirmed"), ("tampered", 0.55, "open")):
            session.add(m.Flag(listing_id=row.id, image_id=image_ids[0], kind=kind, score=score, status=status,
                               evidence={}, model_version="x@1"))
        session.flush()
        orm_flags = session.scalars(select(m.Flag).where(m.Flag.listing_id == row.id)).all()
        by_orm, _ = champion_fraud_score(orm_flags, settings)
        by_rows, _ = champion_fraud_score(listing_flags(session, row.id), settings)
        assert by_rows == by_orm and list(by_rows.contributions) == list(by_orm.contributions)
        decisions = set()
        for dismiss, complete in ((False, True), (False, False), (True, True), (True, False)):
            if dismiss:  # every verdict "dismissed": ok, or incomplete with an unanalysed image
                for flag in orm_flags:
                    flag.status = "dismissed"
            session.get_one(m.Image, image_ids[1]).complete = complete
            session.flush()
            images = listing_images(session, row.id)
            assert sum(1 for i in images if not (i.status == "done" and i.complete in (None, True))) \
                == unanalysed_images(session, row.id)
            update_fraud_score(session, row, settings)
            expected = (row.fraud_score, row.fraud_decision)
            update_fraud_score(session, row, settings, images=images, flags=listing_flags(session, row.id))
            assert (row.fraud_score, row.fraud_decision) == expected
            decisions.add(row.fraud_decision)
        assert {"ok", "incomplete"} <= decisions and len(decisions) == 3
        session.rollback()


def test_relay_counts_a_failed_publish_and_marks_rows_without_a_stream(env: dict) -> None:
    """Redis unreachable: the row stays unpublished with the attempt and the error counted;
    the next relay publishes it and clears the error. With the stream off (a webhook only) a
    row is marked published without an entry."""
    listing = unique("L")
    finish(env, listing, [photo(env["tmp"] / "a.png")])
    down = relay(load_settings(results_redis_url="redis://127.0.0.1:1/0"))
    assert down.failed >= 1 and down.error and "results stream" in down.error
    (row,) = outbox_rows(env["url"], listing)
    assert row.published_at is None and row.attempts == 1 and row.last_error == down.error[:2000]
    up = relay(get_settings())
    assert up.published >= 1 and up.error is None
    (row,) = outbox_rows(env["url"], listing)
    assert row.published_at is not None and row.attempts == 2 and row.last_error is None and row.stream_id
    entries = [f for _id, f in env["redis"].xrange(env["stream"]) if f[b"event_id"].decode() == row.event_id]
    assert [json.loads(f[b"event"]) for f in entries] == [row.payload]

    other = unique("L")
    off = load_settings(results_redis_url="off", webhook_url="https://shop.example/hook", webhook_secret="s3cret")
    outcome = apply(env["url"], event(other, [photo(env["tmp"] / "b.png", colour=(0, 90, 0))]))
    analyze_all(env["url"], off, outcome.images_to_analyze)
    report = relay(off)
    (row,) = outbox_rows(env["url"], other)
    assert report.error is None and row.published_at is not None and row.stream_id is None
    assert row.id in report.webhook_ids and row.webhook_status == "queued"
