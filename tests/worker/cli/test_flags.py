"""`catalog flags`: the reviewer gaps of issue 10 -- external listing ids and photo paths where
a person reads them, claiming a specific flag, unknown kinds refused with the valid ones, times
with date and time zone."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from db import models as m
from db.session import transaction
from worker.cli.main import main


@pytest.fixture
def db(tmp_path: Path, sqlite_template: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    import shutil

    path = tmp_path / "catalog.db"
    shutil.copy(sqlite_template, path)
    url = f"sqlite:///{path}"
    monkeypatch.setenv("CATALOG_DATABASE_URL", url)
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path / "data"))
    return url


def _flag(url: str, kind: str = "duplicate_image") -> tuple[str, int]:
    external = f"shop-{uuid.uuid4().hex[:6]}"
    with transaction(url) as session:
        listing = m.Listing(external_id=external, seller_id="s", title="")
        session.add(listing)
        session.flush()
        img = m.Image(listing_id=listing.id, url="/photos/red-shoe.jpg", status="done")
        session.add(img)
        session.flush()
        flag = m.Flag(listing_id=listing.id, image_id=img.id, kind=kind, score=0.9,
                      evidence={"summary": "same photo"})
        session.add(flag)
        session.flush()
        return external, flag.id


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_list_names_the_external_listing_id_and_the_photo(db: str) -> None:
    external, flag_id = _flag(db)
    code, out = run("flags", "list")
    assert code == 0 and f"listing {external}" in out and "photo /photos/red-shoe.jpg" in out
    code, shown = run("show", external)
    assert code == 0  # the id printed is one `catalog show` accepts


def test_claim_a_specific_flag_then_resolve_it(db: str) -> None:
    _, first = _flag(db)
    _, second = _flag(db)
    code, out = run("flags", "claim", str(second), "--reviewer", "ann")
    assert code == 0 and out.startswith(f"#{second}") and "claimed by ann until" in out
    # Date, time and zone: 2026-11-30 01:02:03 UTC
    assert re.search(r"until \d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} \S+", out)
    code, out = run("flags", "claim", str(second), "--reviewer", "bob")
    assert code == 1 and "claimed by ann until" in out
    code, out = run("flags", "resolve", str(second), "--reviewer", "ann", "--verdict", "confirmed")
    assert code == 0 and re.search(r"confirmed by ann at \d{4}-\d{2}-\d{2} ", out)
    code, out = run("flags", "claim", "--reviewer", "bob")
    assert code == 0 and out.startswith(f"#{first}") and "photo: /photos/red-shoe.jpg" in out
    assert run("flags", "claim", "999999", "--reviewer", "bob")[0] == 1


def test_unknown_kind_is_an_error_listing_the_valid_kinds(db: str) -> None:
    _flag(db)
    for args in (("flags", "list", "--kind", "bogus"), ("flags", "claim", "--reviewer", "a", "--kind", "bogus")):
        code, out = run(*args)
        assert code == 1 and "unknown flag kind 'bogus'" in out and "duplicate_image" in out and "nsfw" in out
    assert run("flags", "list", "--kind", "contact_info")[1].strip() == "no flags"
