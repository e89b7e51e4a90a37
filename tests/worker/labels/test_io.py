"""Bulk import (CSV, JSON Lines) and export of labels on SQLite and Postgres: a file with any
bad row imports nothing and every bad row is reported by line; re-importing changes nothing;
an export imports back to the same labels."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select

from db import models as m
from db.session import transaction
from tests.support.labels import Catalogue
from worker import labels
from worker.labels.io import export_rows


def _count(url: str) -> int:
    with transaction(url) as s:
        return int(s.execute(select(func.count()).select_from(m.Label)).scalar_one())


def _write(path: Path, text: str) -> Path:
    path.write_text(text.lstrip("\n"), encoding="utf-8")
    return path


def _good_csv(c: Catalogue) -> str:
    return f"""
listing,position,image_id,kind,name,value,box,detection_id,reviewer
{c.listing},0,,tag,backpack,,,,
{c.listing},1,,category,shoes,,,,dana
{c.other},,,category,bags,,,,
,,{c.image},attribute,material,leather,,,
,,{c.image},box,wallet,,"400,300,500,400",,
,,{c.image},box,,,90 40 310 260,{c.detection},
{c.listing},,,box,,,,{c.other_detection},
{c.other},,,tag,bags,,,,
"""


def test_csv_import_writes_every_kind(catalogue: Catalogue, tmp_path: Path) -> None:
    path = _write(tmp_path / "labels.csv", _good_csv(catalogue))
    with transaction(catalogue.url) as s:
        report = labels.import_labels(s, path, "importer")
    assert report.ok and (report.rows, report.imported, report.unchanged) == (8, 8, 0), report.rejected
    with transaction(catalogue.url) as s:
        rows = list(s.execute(select(m.Label).where(m.Label.id.in_(report.label_ids)).order_by(m.Label.id)).scalars())
        other_id = s.execute(select(m.Listing.id).where(m.Listing.external_id == catalogue.other)).scalar_one()
    got = [(r.kind, r.action, r.image_id, r.listing_id, r.name, r.value, r.source, r.reviewer) for r in rows]
    c = catalogue
    assert got == [
        ("tag", "confirm", c.image, None, "backpack", None, "import", "importer"),
        ("category", "set", c.second, None, "shoes", None, "import", "dana"),
        ("category", "set", None, other_id, "bags", None, "import", "importer"),
        ("attribute", "set", c.image, None, "material", "leather", "import", "importer"),
        ("box", "add", c.image, None, "wallet", None, "import", "importer"),
        ("box", "correct", c.image, None, "handbag", None, "import", "importer"),
        ("box", "delete", c.second, None, "person", None, "import", "importer"),
        ("tag", "confirm", c.lone, None, "bags", None, "import", "importer"),  # the listing's only image
    ]
    assert rows[4].x0 == 400 and rows[5].corrects_model_version == "yolo-test-1"

    # The same file again changes nothing: every row already is the active label.
    with transaction(catalogue.url) as s:
        again = labels.import_labels(s, path, "importer")
    assert (again.imported, again.unchanged) == (0, 8)
    assert _count(catalogue.url) == 8


def test_one_bad_row_imports_nothing_and_every_bad_row_is_reported(catalogue: Catalogue, tmp_path: Path) -> None:
    c = catalogue
    text = _good_csv(c) + f"""\
,,999999999,tag,bags,,,,
,,{c.image},colour,red,,,,
,,{c.image},box,wallet,,600 10 700 50,,
,,{c.image},category,shoez,,,,
nope,,,category,bags,,,,
{c.listing},,,tag,bags,,,,
,,{c.image},tag,backpack,,,,,,
,,{c.image},attribute,material,suede,,,
{c.listing},0,,tag,backpack,,,,
,,{c.unsized},box,wallet,,1 2 3 4,,
,,{c.image},tag,backpack,,,,bob,x
,,{c.image},box,wallet,,1 2 x 4,,
,,{c.image},tag,bags,seller,,,
"""
    path = _write(tmp_path / "broken.csv", text)
    with transaction(c.url) as s:
        report = labels.import_labels(s, path, "importer")
    reasons = {r.line: r.reason for r in report.rejected}
    assert not report.ok and report.imported == 0 and report.rows == 21
    assert reasons == {
        10: "image 999999999 does not exist",
        11: "unknown kind 'colour'; use one of tag, category, box, attribute",
        12: f"box (600 10 700 50) is outside image {c.image} (640x480 pixels)",
        13: "unknown category 'shoez' (did you mean 'shoes'?): it is not in the taxonomy, the sellers' "
            "categories or earlier labels; allow it as a new category to add it",
        14: "listing 'nope' does not exist",
        15: f"listing {c.listing!r} has 3 images: give image_id or position for a per-image label",
        16: "broken CSV row: 11 fields where the header has 9",
        17: "conflicts with line 5 (set material=leather) for the same label",
        18: "duplicates line 2 (confirm backpack) for the same label",
        19: f"image {c.unsized} has no known size yet (not analysed), so a box on it cannot be checked",
        20: "broken CSV row: 10 fields where the header has 9",
        21: "a box is four numbers x0 y0 x1 y1, not ['1', '2', 'x', '4']",
        22: "a tag label takes no value (got 'seller'); only attributes are name=value",
    }
    assert _count(c.url) == 0  # not even the eight good rows


def test_seller_labels_are_refused(catalogue: Catalogue, tmp_path: Path) -> None:
    path = _write(tmp_path / "seller.csv", f"image_id,kind,name,source\n{catalogue.image},category,bags,seller\n")
    with transaction(catalogue.url) as s:
        report = labels.import_labels(s, path, "importer")
    assert [str(r) for r in report.rejected] == [
        "line 2: sellers' categories are weak labels: they stay in the listings, not in labels"]


def test_unterminated_quote_and_file_level_errors(catalogue: Catalogue, tmp_path: Path) -> None:
    path = _write(tmp_path / "quote.csv", f'image_id,kind,name\n{catalogue.image},tag,backpack\n'
                                          f'{catalogue.image},tag,"bags\n')
    with transaction(catalogue.url) as s:
        report = labels.import_labels(s, path, "importer")
    assert [r.line for r in report.rejected] == [3] and "broken CSV row" in report.rejected[0].reason
    assert report.imported == 0 and _count(catalogue.url) == 0

    with pytest.raises(labels.LabelFileError, match="unknown column.*'lable'"), transaction(catalogue.url) as s:
        labels.import_labels(s, _write(tmp_path / "cols.csv", "image_id,kind,lable\n1,tag,x\n"), "i")
    (tmp_path / "latin.csv").write_bytes(b"image_id,kind,name\n1,tag,caf\xe9\n")
    with pytest.raises(labels.LabelFileError, match="not UTF-8"), transaction(catalogue.url) as s:
        labels.import_labels(s, tmp_path / "latin.csv", "i")
    with pytest.raises(labels.LabelFileError, match="cannot tell the format"), transaction(catalogue.url) as s:
        labels.import_labels(s, _write(tmp_path / "labels.txt", "x"), "i")
    with pytest.raises(labels.LabelFileError, match="cannot read"), transaction(catalogue.url) as s:
        labels.import_labels(s, tmp_path / "missing.csv", "i")


def test_jsonl_import_reports_bad_lines(catalogue: Catalogue, tmp_path: Path) -> None:
    c = catalogue
    lines = [
        {"image_id": c.image, "kind": "box", "name": "wallet", "box": [400, 300, 500, 400]},
        {"listing": c.other, "kind": "attribute", "name": "material", "value": "canvas", "reviewer": "eve"},
        "not json {",
        [1, 2],
        {"image_id": c.image, "kind": "tag", "nmae": "bags"},
        {"image_id": c.image, "kind": "flag_verdict", "name": "duplicate_image", "value": "confirmed"},
        {"image_id": "seven", "kind": "tag", "name": "bags"},
    ]
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n\n"
    path = _write(tmp_path / "labels.jsonl", text)
    with transaction(c.url) as s:
        report = labels.import_labels(s, path, "importer")
    got = {r.line: r.reason for r in report.rejected}
    assert set(got) == {3, 4, 5, 6, 7}
    assert got[3].startswith("not valid JSON") and got[4] == "a row is a JSON object, not list"
    assert "unknown column(s) 'nmae'" in got[5] and "catalog flags resolve" in got[6]
    assert got[7] == "image_id must be a whole number, not 'seven'"
    assert _count(c.url) == 0
    # Without the bad lines the file imports, and a dry run first writes nothing.
    _write(path, "\n".join(json.dumps(line) for line in lines[:2]) + "\n")
    with transaction(c.url) as s:
        dry = labels.import_labels(s, path, "importer", dry_run=True)
    assert dry.ok and dry.imported == 2 and _count(c.url) == 0
    with transaction(c.url) as s:
        done = labels.import_labels(s, path, "importer")
    assert done.imported == 2 and _count(c.url) == 2


def test_new_categories_need_the_option(catalogue: Catalogue, tmp_path: Path) -> None:
    path = _write(tmp_path / "new.csv", f"image_id,kind,name\n{catalogue.image},category,vegan handbags\n"
                                        f"{catalogue.second},category,vegan handbags\n")
    with transaction(catalogue.url) as s:
        refused = labels.import_labels(s, path, "importer")
    assert [r.line for r in refused.rejected] == [2, 3]
    with transaction(catalogue.url) as s:
        accepted = labels.import_labels(s, path, "importer", new_categories=True)
    assert accepted.ok and accepted.imported == 2


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_export_imports_back_to_the_same_labels(catalogue: Catalogue, tmp_path: Path, fmt: str) -> None:
    c = catalogue
    with transaction(c.url) as s:
        labels.confirm_tag(s, c.image, "backpack", "alice", note='says "backpack", twice')
        labels.reject_tag(s, c.image, "backpack", "bob")  # supersedes: only this one is exported
        labels.set_category(s, "shoes", "alice", listing_external_id=c.listing)
        labels.correct_box(s, c.detection, (90.5, 40.25, 310, 260), "carol", label="backpack")
        labels.delete_box(s, c.other_detection, "carol")
        labels.add_box(s, c.lone, "wallet", (1, 2, 30, 40), "carol")
        labels.set_attribute(s, "material", "cuir, brun", "dana", image_id=c.image)
        before = export_rows(s)
        out = io.StringIO()
        assert labels.export_labels(s, out, fmt) == 6
    path = tmp_path / f"labels.{fmt}"
    path.write_text(out.getvalue(), encoding="utf-8")
    with transaction(c.url) as s:
        s.execute(delete(m.Label))
    with transaction(c.url) as s:
        report = labels.import_labels(s, path, "someone-else")
    assert report.ok and report.imported == 6, report.rejected
    with transaction(c.url) as s:
        after = export_rows(s)

    def strip(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "created_at"} for row in rows]

    assert strip(after) == strip(before)
    assert {r["reviewer"] for r in after} == {"bob", "alice", "carol", "dana"}  # kept, not "someone-else"
    assert {r["source"] for r in after} == {"review"}


def test_export_of_flag_verdicts_only_on_request(catalogue: Catalogue) -> None:
    with transaction(catalogue.url) as s:
        labels.record_flag_verdict(s, catalogue.flag, "confirmed", "alice")
        default, verdicts = io.StringIO(), io.StringIO()
        assert labels.export_labels(s, default, "jsonl") == 0
        assert labels.export_labels(s, verdicts, "jsonl", kinds=["flag_verdict"]) == 1
    row = json.loads(verdicts.getvalue())
    assert (row["kind"], row["action"], row["value"], row["image_id"]) == (
        "flag_verdict", "confirm", "confirmed", catalogue.image)


def test_rows_naming_a_detection_must_agree_with_their_listing_and_action(catalogue: Catalogue, tmp_path: Path) -> None:
    c = catalogue
    path = _write(tmp_path / "dets.csv", f"""\
listing,image_id,kind,action,box,detection_id
{c.other},,box,,,{c.detection}
,{c.image},box,correct,,{c.detection}
,{c.image},box,delete,1 2 3 4,{c.detection}
,{c.image},box,add,1 2 3 4,{c.detection}
,{c.image},box,move,1 2 3 4,{c.detection}
""")
    with transaction(c.url) as s:
        report = labels.import_labels(s, path, "importer")
    assert [str(r) for r in report.rejected] == [
        f"line 2: detection {c.detection} is not on listing {c.other!r}",
        "line 3: a corrected box needs its new coordinates x0 y0 x1 y1",
        "line 4: a deleted box takes no coordinates",
        "line 5: an added box is new: it takes no detection id (use correct)",
        "line 6: a box is added, corrected or deleted, not 'move'",
    ]
    assert _count(c.url) == 0
