"""Bulk labels: import a shop's existing labels from CSV or JSON Lines, export the active ones.

Import is all-or-nothing. Every row is read, resolved and validated with the same checks as
a reviewer's label (``worker.labels.review``), rows of one file are checked against each other
(a duplicate or a conflicting second row for the same thing), and only a file without a single
rejected row is written, in one savepoint. The report names every rejected row with its line
number and the reason. A row that says exactly what the active label already says is counted
as unchanged and not written again, so running an import twice is harmless.

Columns (CSV header / JSON keys; docs/labels.md has examples):
``image_id`` or ``listing`` (external id, with ``position`` for one of its photos), ``kind``
(tag, category, box, attribute), ``action`` (default: confirm, set, add), ``name``, ``value``,
``box`` ("x0 y0 x1 y1" pixels, or a JSON list), ``detection_id``, ``source`` (import | review),
``reviewer``, ``note``. ``split`` and ``created_at`` are written by the export and ignored on
import: the split is the image's own and the time is the import's.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import models as m
from worker.labels import review
from worker.labels.store import (
    InvalidLabel,
    LabelError,
    LabelSpec,
    UnknownTarget,
    active_labels,
    begin_write,
    write,
)

COLUMNS = ("image_id", "listing", "position", "kind", "action", "name", "value", "box",
           "detection_id", "source", "reviewer", "note", "split", "created_at")
ALIASES = {"listing_external_id": "listing"}
FORMATS = ("csv", "jsonl")
#: Kinds a file may carry. Flag verdicts are recorded by `catalog flags resolve` (they change
#: the flag and the listing's fraud score), so they are exported on request but never imported.
IMPORTABLE_KINDS = ("tag", "category", "box", "attribute")


class LabelFileError(LabelError):
    """The file as a whole cannot be read (missing, not UTF-8, unknown format or columns)."""


@dataclass(frozen=True)
class Rejected:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class ImportReport:
    """What an import did (or, with ``dry_run`` or any rejected row, would have done)."""

    path: str
    format: str
    rows: int = 0
    imported: int = 0
    unchanged: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    dry_run: bool = False
    label_ids: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.rejected

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "rows": self.rows, "imported": self.imported,
                "unchanged": self.unchanged, "dry_run": self.dry_run, "ok": self.ok,
                "rejected": [{"line": r.line, "reason": r.reason} for r in self.rejected]}


def detect_format(path: Path, fmt: str | None = None) -> str:
    if fmt:
        if fmt not in FORMATS:
            raise LabelFileError(f"unknown label file format {fmt!r}; use csv or jsonl")
        return fmt
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    raise LabelFileError(f"{path.name}: cannot tell the format from the suffix; use .csv or .jsonl")


# --- reading -------------------------------------------------------------------------------
def _columns(names: Iterable[str], line: int) -> list[str]:
    cleaned = [ALIASES.get(n.strip().lower(), n.strip().lower()) for n in names]
    unknown = [n for n in cleaned if n not in COLUMNS]
    if unknown:
        raise LabelFileError(f"line {line}: unknown column(s) {', '.join(repr(u) for u in unknown)}; "
                             f"known: {', '.join(COLUMNS)}")
    if "kind" not in cleaned:
        raise LabelFileError(f"line {line}: the column 'kind' is missing")
    return cleaned


def read_csv(text: str) -> tuple[list[tuple[int, dict[str, Any]]], list[Rejected]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[tuple[int, dict[str, Any]]] = []
    bad: list[Rejected] = []
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise LabelFileError(f"line 1: unreadable CSV header ({exc})") from None
    if header is None:
        return rows, bad
    names = _columns(header, 1)
    end = reader.line_num
    while True:
        start = end + 1
        try:
            record = next(reader, None)
        except csv.Error as exc:
            bad.append(Rejected(start, f"broken CSV row ({exc}); the rest of the file was not read"))
            break
        if record is None:
            break
        end = reader.line_num
        if not any(v.strip() for v in record):
            continue
        if len(record) != len(names):
            bad.append(Rejected(start, f"broken CSV row: {len(record)} fields where the header has "
                                       f"{len(names)}"))
            continue
        rows.append((start, {k: (v.strip() or None) for k, v in zip(names, record, strict=True)}))
    return rows, bad


def read_jsonl(text: str) -> tuple[list[tuple[int, dict[str, Any]]], list[Rejected]]:
    rows: list[tuple[int, dict[str, Any]]] = []
    bad: list[Rejected] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as exc:
            bad.append(Rejected(number, f"not valid JSON ({str(exc)[:120]})"))
            continue
        if not isinstance(obj, dict):
            bad.append(Rejected(number, f"a row is a JSON object, not {type(obj).__name__}"))
            continue
        try:
            names = _columns(obj.keys(), number)
        except LabelFileError as exc:
            bad.append(Rejected(number, str(exc).split(": ", 1)[1]))
            continue
        values = [None if (isinstance(v, str) and not v.strip()) else v for v in obj.values()]
        rows.append((number, dict(zip(names, values, strict=True))))
    return rows, bad


# --- resolving one row ---------------------------------------------------------------------
def _int(value: Any, column: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise InvalidLabel(f"{column} must be a whole number, not {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidLabel(f"{column} must be a whole number, not {value!r}") from None


def _str(value: Any) -> str | None:
    return None if value is None else str(value).strip() or None


def parse_box(value: Any) -> Any:
    """``"x0 y0 x1 y1"`` (spaces, commas or semicolons) or a list; None when absent."""
    if value is None or isinstance(value, list | tuple):
        return value
    text = str(value).strip().strip("[]()")
    return [part for part in re.split(r"[\s,;]+", text) if part] if text else None


@dataclass
class _Context:
    reviewer: str
    new_categories: bool
    known: set[str]


def _image_of_listing(session: Session, listing: m.Listing, position: int | None, kind: str) -> int | None:
    images = list(session.execute(select(m.Image.id, m.Image.position)
                                  .where(m.Image.listing_id == listing.id).order_by(m.Image.id)).all())
    if position is not None:
        at = [i for i, p in images if p == position]
        if len(at) != 1:
            problem = "no image" if not at else f"{len(at)} images"
            raise UnknownTarget(f"listing {listing.external_id!r} has {problem} at position {position}")
        return at[0]
    if kind in ("tag", "box"):
        if len(images) != 1:
            raise InvalidLabel(f"listing {listing.external_id!r} has {len(images)} images: give "
                               "image_id or position for a per-image label")
        return images[0][0]
    return None


def row_spec(session: Session, row: dict[str, Any], ctx: _Context) -> LabelSpec:
    """One file row as a validated label, or a ``LabelError`` saying what is wrong with it."""
    kind = (_str(row.get("kind")) or "").lower()
    if kind == "flag_verdict":
        raise InvalidLabel("flag verdicts are recorded with `catalog flags resolve`, not imported")
    if kind not in IMPORTABLE_KINDS:
        raise InvalidLabel(f"unknown kind {kind or None!r}; use one of {', '.join(IMPORTABLE_KINDS)}")
    source = (_str(row.get("source")) or "import").lower()
    if source == "seller":
        raise InvalidLabel("sellers' categories are weak labels: they stay in the listings, not in labels")
    if source not in ("import", "review"):
        raise InvalidLabel(f"unknown source {source!r}; use import or review")
    reviewer = _str(row.get("reviewer")) or ctx.reviewer
    note = _str(row.get("note"))
    image_id, position = _int(row.get("image_id"), "image_id"), _int(row.get("position"), "position")
    external = _str(row.get("listing"))
    listing_ext: str | None = None
    if image_id is not None:
        image = session.get(m.Image, image_id)
        if image is None:
            raise UnknownTarget(f"image {image_id} does not exist")
        if external is not None or position is not None:
            owner = session.get_one(m.Listing, image.listing_id)
            if external is not None and owner.external_id != external:
                raise UnknownTarget(f"image {image_id} belongs to listing {owner.external_id!r}, not {external!r}")
            if position is not None and image.position != position:
                raise UnknownTarget(f"image {image_id} is at position {image.position}, not {position}")
    elif external is not None:
        listing = review.listing_by_external_id(session, external)
        if kind == "box" and row.get("detection_id") is not None and position is None:
            det = session.get(m.Detection, _int(row.get("detection_id"), "detection_id"))
            owner_id = session.get_one(m.Image, det.image_id).listing_id if det is not None else None
            if det is not None and owner_id != listing.id:
                raise UnknownTarget(f"detection {det.id} is not on listing {external!r}")
            image_id = None  # the detection names its image
        else:
            image_id = _image_of_listing(session, listing, position, kind)
        listing_ext = external if image_id is None else None
    else:
        raise InvalidLabel("the row names no image_id and no listing")

    action = (_str(row.get("action")) or "").lower() or None
    name, value = _str(row.get("name")), _str(row.get("value"))
    if value is not None and kind != "attribute":
        raise InvalidLabel(f"a {kind} label takes no value (got {value!r}); only attributes are name=value")
    if kind == "tag":
        assert image_id is not None
        return review.tag_spec(session, image_id, name or "", action or "confirm", reviewer,
                               source=source, note=note)
    if kind == "category":
        if action not in (None, "set"):
            raise InvalidLabel(f"a category is set, not {action!r}")
        spec = review.category_spec(session, name or "", reviewer, image_id=image_id,
                                    listing_external_id=listing_ext, new_category=ctx.new_categories,
                                    known=ctx.known, source=source, note=note)
        ctx.known.add(spec.name or "")
        return spec
    if kind == "attribute":
        if action not in (None, "set"):
            raise InvalidLabel(f"an attribute is set, not {action!r}")
        return review.attribute_spec(session, name or "", value or "", reviewer, image_id=image_id,
                                     listing_external_id=listing_ext, source=source, note=note)
    box, detection_id = parse_box(row.get("box")), _int(row.get("detection_id"), "detection_id")
    if action is None:
        action = "add" if detection_id is None else ("correct" if box is not None else "delete")
    return review.box_spec(session, action, reviewer, image_id=image_id, detection_id=detection_id,
                           label=name, box=box, source=source, note=note)


def _describe(spec: LabelSpec) -> str:
    parts = [spec.action, spec.name or "", f"={spec.value}" if spec.value else ""]
    if spec.box is not None:
        parts.append(" (" + " ".join(f"{v:g}" for v in spec.box) + ")")
    return "".join(p if i != 1 else f" {p}" for i, p in enumerate(parts)).strip()


# --- import --------------------------------------------------------------------------------
def import_labels(session: Session, path: Path | str, reviewer: str, *, fmt: str | None = None,
                  dry_run: bool = False, new_categories: bool = False,
                  heldout: int | None = None) -> ImportReport:
    """Validate every row of ``path``; write them all (one savepoint) only if none is rejected
    and not ``dry_run``. ``reviewer`` is the default for rows without one; ``new_categories``
    accepts categories nobody used before (otherwise they are rejected as likely typos)."""
    path = Path(path)
    fmt = detect_format(path, fmt)
    report = ImportReport(str(path), fmt, dry_run=dry_run)
    reviewer = (reviewer or "").strip()
    if not reviewer:
        raise InvalidLabel("a reviewer name is required (the default for rows without one)")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise LabelFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise LabelFileError(f"{path.name} is not UTF-8 text (byte {exc.start})") from None
    rows, report.rejected = (read_csv if fmt == "csv" else read_jsonl)(text)
    report.rows = len(rows) + len(report.rejected)

    ctx = _Context(reviewer, new_categories, review.known_categories(session))
    seen: dict[tuple[Any, ...], tuple[int, LabelSpec]] = {}
    specs: list[LabelSpec] = []
    for line, row in rows:
        try:
            spec = row_spec(session, row, ctx)
        except LabelError as exc:
            report.rejected.append(Rejected(line, str(exc)))
            continue
        key = spec.key()
        if key in seen:
            first, other = seen[key]
            what = "duplicates" if _describe(other) == _describe(spec) else "conflicts with"
            report.rejected.append(Rejected(line, f"{what} line {first} ({_describe(other)}) for the "
                                                  "same label"))
            continue
        seen[key] = (line, spec)
        current = active_labels(session, spec)
        if current and spec.same_content(current[-1]):
            report.unchanged += 1
            continue
        specs.append(spec)
    report.rejected.sort(key=lambda r: r.line)
    if report.rejected or dry_run:
        report.imported = 0 if report.rejected else len(specs)
        return report
    percent = review.heldout_percent(heldout)
    with session.begin_nested():
        _lock_in_order(session, specs)
        report.label_ids = [write(session, spec, percent).id for spec in specs]
    report.imported = len(specs)
    return report


def _lock_in_order(session: Session, specs: list[LabelSpec]) -> None:
    """Take the row locks of every target up front, listings then images, each by id: the lock
    order of the pipeline, so an import never deadlocks with a worker finishing a listing."""
    begin_write(session)
    listings = sorted({s.listing_id for s in specs if s.listing_id is not None})
    images = sorted({s.image_id for s in specs if s.image_id is not None})
    if listings:
        session.execute(select(m.Listing.id).where(m.Listing.id.in_(listings))
                        .order_by(m.Listing.id).with_for_update())
    if images:
        session.execute(select(m.Image.id).where(m.Image.id.in_(images))
                        .order_by(m.Image.id).with_for_update())


# --- export --------------------------------------------------------------------------------
def export_rows(session: Session, kinds: Iterable[str] = IMPORTABLE_KINDS) -> list[dict[str, Any]]:
    """The active labels of ``kinds`` as file rows (the import's columns), oldest first."""
    img = m.Image.__table__.alias("img")
    lst = m.Listing.__table__.alias("lst")
    image_listing = m.Listing.__table__.alias("image_listing")
    stmt = (select(m.Label, img.c.position, lst.c.external_id, image_listing.c.external_id)
            .outerjoin(img, img.c.id == m.Label.image_id)
            .outerjoin(image_listing, image_listing.c.id == img.c.listing_id)
            .outerjoin(lst, lst.c.id == m.Label.listing_id)
            .where(m.Label.active.is_(True), m.Label.kind.in_(list(kinds))).order_by(m.Label.id))
    out = []
    for label, position, listing_ext, image_listing_ext in session.execute(stmt):
        box = [label.x0, label.y0, label.x1, label.y1] if label.x0 is not None else None
        created = label.created_at
        if created is not None and created.tzinfo is None:
            created = created.replace(tzinfo=UTC)  # SQLite hands back naive UTC times
        out.append({"image_id": label.image_id, "listing": listing_ext or image_listing_ext,
                    "position": position, "kind": label.kind, "action": label.action,
                    "name": label.name, "value": label.value, "box": box,
                    "detection_id": label.detection_id, "source": label.source,
                    "reviewer": label.reviewer, "note": label.note, "split": label.split,
                    "created_at": created.isoformat() if created else None})
    return out


def export_labels(session: Session, out: TextIO, fmt: str = "csv",
                  kinds: Iterable[str] = IMPORTABLE_KINDS) -> int:
    """Write the active labels to ``out`` in ``fmt`` (csv or jsonl); returns the row count."""
    if fmt not in FORMATS:
        raise LabelFileError(f"unknown label file format {fmt!r}; use csv or jsonl")
    kinds = list(kinds)
    unknown = [k for k in kinds if k not in (*IMPORTABLE_KINDS, "flag_verdict")]
    if unknown:
        raise InvalidLabel(f"unknown kind(s) {', '.join(unknown)}")
    rows = export_rows(session, kinds)
    if fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        return len(rows)
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        box = row["box"]
        writer.writerow({**row, "box": " ".join(f"{v:.10g}" for v in box) if box else None})
    return len(rows)
