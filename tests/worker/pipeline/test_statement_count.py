"""How many SQL statements one image costs, on both databases (correctness, not timing: a
count guards against regressions such as DELETEs of results a first analysis cannot have, or
an autoflush that writes the image row twice).

With only the ``metadata`` step, a first analysis is one claim transaction and one store
transaction. The bounds below are what the code does today; a change that adds statements
per image has to raise them on purpose."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import event as sa_event
from sqlalchemy import select

from db import models as m
from db.session import get_engine, session_factory
from tests.support.pipeline import analyze_all, apply, count, event, photo
from tests.support.services import REDIS_URL, unique

#: Statements of a first analysis with only the metadata step (BEGIN/COMMIT not counted).
FIRST_ANALYSIS_MAX = 12
#: The same for the listing's last image, which also finishes the listing (fraud score, outbox).
FINISHING_ANALYSIS_MAX = 16


@contextmanager
def counted(url: str) -> Iterator[list[str]]:
    statements: list[str] = []

    def _before(conn, cursor, statement, parameters, context, executemany) -> None:
        statements.append(" ".join(statement.split()).upper())

    engine = get_engine(url)
    sa_event.listen(engine, "before_cursor_execute", _before)
    try:
        yield statements
    finally:
        sa_event.remove(engine, "before_cursor_execute", _before)


def test_first_analysis_statement_count(db_url: str, tmp_path: Path, make_settings) -> None:
    # a results stream configured: the finish records listing.processed (nothing is published here)
    settings = make_settings(database_url=db_url, steps=["metadata"], results_redis_url=REDIS_URL)
    out = apply(db_url, event(unique("L"), [photo(tmp_path / "a.png"), photo(tmp_path / "b.png", (0, 90, 0))]))
    first, second = out.images_to_analyze
    with counted(db_url) as statements:
        assert analyze_all(db_url, settings, [first])[0].status == "done"
    kinds = [s.split(None, 1)[0] for s in statements]
    kinds = [k for k in kinds if k not in ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")]
    # Nothing was ever stored for this image: no DELETE of old results (at most one of
    # search_vectors is tolerated), one UPDATE of its row in the claim and one in the store.
    deletes = [s for s in statements if s.startswith("DELETE")]
    assert all(s.startswith("DELETE FROM SEARCH_VECTORS") for s in deletes) and len(deletes) <= 1, deletes
    assert kinds.count("UPDATE") <= 2, " ".join(kinds)
    assert len(kinds) <= FIRST_ANALYSIS_MAX, " ".join(kinds)
    # The listing's last image: it also finishes the listing (status, fraud score, outbox row).
    with counted(db_url) as statements:
        assert analyze_all(db_url, settings, [second])[0].status == "done"
    kinds = [k for k in (s.split(None, 1)[0] for s in statements)
             if k not in ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")]
    # The finish reads the images and the flags once each (pending check, score, decision and
    # the payload share them), writes the listing row once, then the payload's tags and model
    # versions and the outbox row.
    assert sum(s.startswith("UPDATE LISTINGS") for s in statements) == 1, statements
    assert sum(s.startswith("SELECT FLAGS") for s in statements) == 1, statements
    assert sum(s.startswith("SELECT IMAGES.ID, IMAGES.POSITION") for s in statements) == 1, statements
    assert sum(s.startswith("INSERT INTO OUTBOX_EVENTS") for s in statements) == 1, statements
    assert len(kinds) <= FINISHING_ANALYSIS_MAX, " ".join(kinds)
    with session_factory(db_url)() as session:
        img = session.get_one(m.Image, first)
        assert img.phash is not None and img.dhash is not None and img.processed_at is not None
        assert session.get_one(m.Listing, out.listing_id).status == "done"


def test_reanalysis_still_replaces_the_previous_results(db_url: str, tmp_path: Path, make_settings) -> None:
    """An image analysed before (processed_at set) has its old rows cleared: one step run, one
    set of hashes, never two."""
    settings = make_settings(database_url=db_url, steps=["metadata"])
    listing, a = unique("L"), photo(tmp_path / "a.png")
    first = apply(db_url, event(listing, [a]))
    analyze_all(db_url, settings, first.images_to_analyze)
    image_id = first.images_to_analyze[0]
    with session_factory(db_url)() as session:
        old_hash = session.get_one(m.Image, image_id).phash
    photo(tmp_path / "a.png", (250, 250, 0), size=(80, 40))  # new bytes: analysed again
    again = apply(db_url, event(listing, [a], etype="listing.updated"))
    with counted(db_url) as statements:
        assert analyze_all(db_url, settings, again.images_to_analyze)[0].status == "done"
    assert any(s.startswith("DELETE FROM STEP_RUNS") for s in statements)
    assert count(db_url, m.StepRunRecord, m.StepRunRecord.image_id == image_id) == 1
    with session_factory(db_url)() as session:
        run = session.execute(select(m.StepRunRecord).where(m.StepRunRecord.image_id == image_id)).scalar_one()
        assert run.output["width"] == 80
        assert session.get_one(m.Image, image_id).phash != old_hash


#: Statements of applying a listing.created event with four new images (BEGIN/COMMIT not counted):
#: Postgres inserts the images in one statement (RETURNING their ids in order), SQLite one by one;
#: the new listing row comes back from its INSERT (no SELECT ... FOR UPDATE, no load of its images).
NEW_LISTING_EVENT_MAX = {"postgresql": 4, "sqlite": 7}


def test_new_listing_event_statement_count(db_url: str, tmp_path: Path) -> None:
    refs = [photo(tmp_path / f"{name}.png", (40 * i, 90, 9)) for i, name in enumerate("abcd")]
    with counted(db_url) as statements:
        out = apply(db_url, event(unique("L"), refs))
    kinds = [s.split(None, 1)[0] for s in statements]
    kinds = [k for k in kinds if k not in ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")]
    assert kinds.count("UPDATE") <= 1, " ".join(kinds)  # the listing row is written once
    assert len(kinds) <= NEW_LISTING_EVENT_MAX[get_engine(db_url).dialect.name], " ".join(kinds)
    # The ids come back in the order of the event's images (one multi-row INSERT).
    with session_factory(db_url)() as session:
        rows = session.execute(select(m.Image.id, m.Image.url, m.Image.position)
                               .where(m.Image.listing_id == out.listing_id)).all()
    by_id = {row.id: (row.url, row.position) for row in rows}
    assert [by_id[i] for i in out.images_to_analyze] == [(ref, n) for n, ref in enumerate(refs)]
