"""`catalog labels ...`: each command writes through worker.labels, bad input is one line on
stderr with a non-zero exit, and an import with a broken row writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import func, select

from db import models as m
from db.session import transaction
from tests.support.labels import Catalogue, catalogue  # noqa: F401  (the fixture)
from worker.cli.main import main
from worker.config import reset_settings


@pytest.fixture
def run(catalogue: Catalogue, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # noqa: F811
    monkeypatch.setenv("CATALOG_DATABASE_URL", catalogue.url)
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path / "data"))
    reset_settings()

    def _run(*args: object) -> Result:
        return CliRunner().invoke(main, ["labels", *map(str, args)])

    return _run


def _labels(url: str) -> list[tuple[str, str, str | None]]:
    with transaction(url) as s:
        return [(r.kind, r.action, r.name) for r in
                s.execute(select(m.Label).where(m.Label.active.is_(True)).order_by(m.Label.id)).scalars()]


def test_review_commands(run, catalogue: Catalogue) -> None:  # noqa: F811
    c = catalogue
    out = run("tag", c.image, "backpack", "--reject", "--reviewer", "alice")
    assert out.exit_code == 0, out.output
    assert "tag reject backpack on image" in out.output and "corrects tagging-test-1" in out.output
    assert run("category", "shoes", "--listing", c.listing, "--reviewer", "alice").exit_code == 0
    assert run("box", c.image, "--add", "wallet", 1, 2, 30, 40, "--reviewer", "bob").exit_code == 0
    fixed = run("box", c.image, "--correct", c.detection, 90, 40, 310, 260, "--reviewer", "bob")
    assert fixed.exit_code == 0 and "box correct handbag (90 40 310 260)" in fixed.output
    assert run("box", c.second, "--delete", c.other_detection, "--reviewer", "bob").exit_code == 0
    assert run("attribute", "material=leather", "--image", c.image, "--reviewer", "bob").exit_code == 0
    again = run("tag", c.image, "backpack", "--confirm", "--reviewer", "carol")
    assert again.exit_code == 0 and "supersedes #" in again.output
    assert _labels(c.url) == [("category", "set", "shoes"), ("box", "add", "wallet"),
                              ("box", "correct", "handbag"), ("box", "delete", "person"),
                              ("attribute", "set", "material"), ("tag", "confirm", "backpack")]
    stats = run("stats", "--json")
    assert stats.exit_code == 0
    data = json.loads(stats.output)
    assert data["active"] == 6 and data["superseded"] == 1 and data["reviewers"] == 3


@pytest.mark.parametrize(("args", "message"), [
    (("tag", "{image}", "sofa", "--reject", "--reviewer", "a"), "has no tag 'sofa' to reject"),
    (("tag", "{image}", "bags", "--reviewer", "a"), "say --confirm or --reject"),
    (("category", "shoez", "--image", "{image}", "--reviewer", "a"), "did you mean 'shoes'"),
    (("category", "bags", "--reviewer", "a"), "exactly one of --image ID or --listing"),
    (("box", "{image}", "--add", "wallet", "1", "2", "3", "x", "--reviewer", "a"), "numbers"),
    (("box", "{image}", "--add", "wallet", "600", "2", "700", "40", "--reviewer", "a"), "outside image"),
    (("box", "{image}", "--delete", "{other_detection}", "--reviewer", "a"), "belongs to image"),
    (("box", "{image}", "--reviewer", "a"), "exactly one of --add, --correct or --delete"),
    (("attribute", "leather", "--image", "{image}", "--reviewer", "a"), "NAME=VALUE"),
])
def test_bad_input_is_one_line_and_a_failure(run, catalogue: Catalogue, args, message) -> None:  # noqa: F811
    result = run(*(a.format(image=catalogue.image, other_detection=catalogue.other_detection) for a in args))
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output and _labels(catalogue.url) == []


def test_import_export_round_trip_and_broken_file(run, catalogue: Catalogue, tmp_path: Path) -> None:  # noqa: F811
    c = catalogue
    broken = tmp_path / "shop.csv"
    broken.write_text(f"image_id,kind,name\n{c.image},tag,backpack\n{c.image},category,bags,extra\n"
                      f"999999999,tag,bags\n")
    result = run("import", broken, "--reviewer", "shop")
    assert result.exit_code == 1
    assert "shop.csv:line 3: broken CSV row: 4 fields where the header has 3" in result.output
    assert "shop.csv:line 4: image 999999999 does not exist" in result.output
    assert "2 of 3 rows rejected: nothing imported" in result.output and _labels(c.url) == []

    good = tmp_path / "good.csv"
    good.write_text(f"image_id,kind,name\n{c.image},tag,backpack\n{c.image},category,bags\n")
    dry = run("import", good, "--dry-run")
    assert dry.exit_code == 0 and "would import 2 labels" in dry.output and _labels(c.url) == []
    assert run("import", good).exit_code == 0 and len(_labels(c.url)) == 2

    exported = tmp_path / "out.jsonl"
    result = run("export", "--format", "jsonl", "--out", exported)
    assert result.exit_code == 0 and "exported 2 labels" in result.output
    rows = [json.loads(line) for line in exported.read_text().splitlines()]
    assert [(r["kind"], r["name"], r["reviewer"], r["source"]) for r in rows] == [
        ("tag", "backpack", "import", "import"), ("category", "bags", "import", "import")]
    again = run("import", exported, "--json")
    assert again.exit_code == 0 and json.loads(again.output)["unchanged"] == 2
    with transaction(c.url) as s:
        assert s.execute(select(func.count()).select_from(m.Label)).scalar_one() == 2
    csv_out = run("export")
    assert csv_out.exit_code == 0 and csv_out.stdout.startswith("image_id,listing,position,kind")
    assert run("import", tmp_path / "missing.csv").exit_code == 1
