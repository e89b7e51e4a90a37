"""`catalog labels ...`: reviewed labels on the command line (docs/labels.md).

    catalog labels import FILE [--reviewer NAME] [--dry-run] [--new-categories] [--json]
    catalog labels export [--format csv|jsonl] [--out FILE] [--kind KIND ...]
    catalog labels tag IMAGE_ID NAME --confirm|--reject --reviewer R
    catalog labels category (--image ID | --listing EXTERNAL_ID) CATEGORY --reviewer R
    catalog labels box IMAGE_ID (--add LABEL x0 y0 x1 y1 | --correct DETECTION_ID x0 y0 x1 y1
                                 | --delete DETECTION_ID) --reviewer R
    catalog labels attribute (--image ID | --listing EXTERNAL_ID) NAME=VALUE --reviewer R
    catalog labels stats [--json]

Every command is a thin shell over ``worker.labels``; a refused label is a one-line error and
exit status 1.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from sqlalchemy.orm import Session

from db.session import transaction
from worker import labels
from worker.cli.common import cli_settings, ensure_schema
from worker.labels.io import IMPORTABLE_KINDS


@contextmanager
def _session() -> Iterator[Session]:
    """A transaction on the configured database; a refused label becomes a click error."""
    settings = cli_settings()
    ensure_schema(settings)
    try:
        with transaction(settings.effective_database_url) as session:
            yield session
    except labels.LabelError as exc:
        raise click.ClickException(str(exc)) from None


def _echo_label(view: labels.LabelView) -> None:
    target = f"image {view.image_id}" if view.image_id is not None else f"listing {view.listing_id}"
    what = view.name or ""
    if view.value:
        what += f"={view.value}"
    if view.box:
        what += " (" + " ".join(f"{v:g}" for v in view.box) + ")"
    line = f"label #{view.id}: {view.kind} {view.action} {what} on {target} [{view.split}]"
    if view.corrects_model_version:
        line += f", corrects {view.corrects_model_version}"
    if view.superseded:
        line += f", supersedes #{', #'.join(str(i) for i in view.superseded)}"
    click.echo(line)


def _reviewer_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--reviewer", required=True, help="Who decides (recorded with the label).")(f)


@click.group("labels")
def labels_group() -> None:
    """Reviewed labels retraining learns from: review tags, categories and boxes, import and
    export a shop's labels, show counts. Sellers' declared categories are weak labels and are
    never stored here (see docs/labels.md)."""


@labels_group.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--reviewer", default="import", show_default=True,
              help="Reviewer recorded for rows without a reviewer column.")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default=None,
              help="File format [default: from the suffix, .csv or .jsonl].")
@click.option("--dry-run", is_flag=True, help="Validate and report; write nothing.")
@click.option("--new-categories", is_flag=True,
              help="Accept categories that neither the taxonomy, the sellers nor earlier labels know.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def import_cmd(file: Path, reviewer: str, fmt: str | None, dry_run: bool, new_categories: bool,
               as_json: bool) -> None:
    """Import labels from a CSV or JSON Lines FILE, all or nothing: a file with any rejected
    row imports nothing, and every rejected row is listed with its line number and reason."""
    with _session() as session:
        report = labels.import_labels(session, file, reviewer, fmt=fmt, dry_run=dry_run,
                                      new_categories=new_categories)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for rejected in report.rejected:
            click.echo(f"{file.name}:{rejected}", err=True)
        if report.rejected:
            click.echo(f"{len(report.rejected)} of {report.rows} rows rejected: nothing imported", err=True)
        else:
            verb = "would import" if dry_run else "imported"
            click.echo(f"{verb} {report.imported} labels from {report.rows} rows "
                       f"({report.unchanged} unchanged)")
    if report.rejected:
        sys.exit(1)


@labels_group.command("export")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File to write [default: standard output].")
@click.option("--kind", "kinds", multiple=True,
              type=click.Choice([*IMPORTABLE_KINDS, "flag_verdict"]),
              help="Only these kinds (repeatable) [default: every importable kind; flag_verdict "
                   "only when asked].")
def export_cmd(fmt: str, out: Path | None, kinds: tuple[str, ...]) -> None:
    """Write the active labels in the import's format (an export imports back unchanged)."""
    with _session() as session:
        if out is None:
            count = labels.export_labels(session, sys.stdout, fmt, kinds or IMPORTABLE_KINDS)
        else:
            with out.open("w", encoding="utf-8", newline="") as handle:
                count = labels.export_labels(session, handle, fmt, kinds or IMPORTABLE_KINDS)
    click.echo(f"exported {count} labels" + (f" to {out}" if out else ""), err=True)


@labels_group.command("tag")
@click.argument("image_id", type=int)
@click.argument("name")
@click.option("--confirm/--reject", "confirm", default=None,
              help="The image shows NAME (--confirm) or the model's tag NAME is wrong (--reject).")
@_reviewer_option
@click.option("--note", default=None)
def tag_cmd(image_id: int, name: str, confirm: bool | None, reviewer: str, note: str | None) -> None:
    """Confirm or reject tag NAME on image IMAGE_ID."""
    if confirm is None:
        raise click.UsageError("say --confirm or --reject")
    with _session() as session:
        action = labels.confirm_tag if confirm else labels.reject_tag
        view = action(session, image_id, name, reviewer, note=note)
    _echo_label(view)


def _one_target(image: int | None, listing: str | None) -> None:
    if (image is None) == (listing is None):
        raise click.UsageError("give exactly one of --image ID or --listing EXTERNAL_ID")


@labels_group.command("category")
@click.argument("category")
@click.option("--image", type=int, default=None, help="The image whose category this is.")
@click.option("--listing", default=None, help="The listing (external id) whose category this is.")
@click.option("--new-category", is_flag=True, help="CATEGORY is new to this shop: accept it.")
@_reviewer_option
@click.option("--note", default=None)
def category_cmd(category: str, image: int | None, listing: str | None, new_category: bool,
                 reviewer: str, note: str | None) -> None:
    """Set the true CATEGORY of an image or a listing (supersedes an earlier category label)."""
    _one_target(image, listing)
    with _session() as session:
        view = labels.set_category(session, category, reviewer, image_id=image,
                                   listing_external_id=listing, new_category=new_category, note=note)
    _echo_label(view)


@labels_group.command("attribute")
@click.argument("assignment", metavar="NAME=VALUE")
@click.option("--image", type=int, default=None)
@click.option("--listing", default=None, help="Listing external id.")
@_reviewer_option
@click.option("--note", default=None)
def attribute_cmd(assignment: str, image: int | None, listing: str | None, reviewer: str,
                  note: str | None) -> None:
    """Record an attribute such as material=leather of an image or a listing."""
    _one_target(image, listing)
    name, sep, value = assignment.partition("=")
    if not sep:
        raise click.UsageError(f"write the attribute as NAME=VALUE, not {assignment!r}")
    with _session() as session:
        view = labels.set_attribute(session, name, value, reviewer, image_id=image,
                                    listing_external_id=listing, note=note)
    _echo_label(view)


@labels_group.command("box")
@click.argument("image_id", type=int)
@click.option("--add", "add", nargs=5, default=None, metavar="LABEL X0 Y0 X1 Y1",
              help="A box the detector missed (original-image pixels).")
@click.option("--correct", "correct", nargs=5, type=(int, float, float, float, float), default=None,
              metavar="DETECTION_ID X0 Y0 X1 Y1", help="New coordinates of a detection's box.")
@click.option("--label", default=None, help="With --correct: the right class of the detection.")
@click.option("--delete", "delete", type=int, default=None, metavar="DETECTION_ID",
              help="A detection that shows nothing of its class.")
@_reviewer_option
@click.option("--note", default=None)
def box_cmd(image_id: int, add: tuple[str, ...] | None, correct: tuple[Any, ...] | None,
            label: str | None, delete: int | None, reviewer: str, note: str | None) -> None:
    """Add a missing box, correct a detection's box or delete a wrong detection on IMAGE_ID."""
    if sum(x is not None for x in (add, correct, delete)) != 1:
        raise click.UsageError("give exactly one of --add, --correct or --delete")
    with _session() as session:
        if add is not None:
            try:
                box = tuple(float(v) for v in add[1:])
            except ValueError:
                raise click.UsageError(f"--add takes LABEL X0 Y0 X1 Y1 numbers, not {' '.join(add[1:])}") from None
            view = labels.add_box(session, image_id, add[0], box, reviewer, note=note)  # type: ignore[arg-type]
        elif correct is not None:
            view = labels.correct_box(session, correct[0], correct[1:], reviewer, label=label,
                                      image_id=image_id, note=note)
        else:
            assert delete is not None
            view = labels.delete_box(session, delete, reviewer, image_id=image_id, note=note)
    _echo_label(view)


@labels_group.command("stats")
@click.option("--json", "as_json", is_flag=True)
def stats_cmd(as_json: bool) -> None:
    """Active labels by kind and split, sources, superseded history and weak seller labels."""
    with _session() as session:
        stats = labels.label_stats(session)
    if as_json:
        click.echo(json.dumps(stats.to_dict(), indent=2))
        return
    click.echo(f"active labels: {stats.active}  (superseded, kept as history: {stats.superseded}; "
               f"reviewers: {stats.reviewers})")
    for kind, splits in sorted(stats.by_kind.items()):
        click.echo(f"  {kind:13} train {splits.get('train', 0):6}  heldout {splits.get('heldout', 0):6}")
    if stats.by_source:
        click.echo("sources: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.by_source.items())))
    if stats.categories:
        click.echo("categories (train/heldout):")
        for name, splits in stats.categories.items():
            click.echo(f"  {name:30} {splits.get('train', 0):5} / {splits.get('heldout', 0)}")
    click.echo(f"weak labels (sellers' declared categories, not used for promotion): "
               f"{stats.weak_categories}")


if __name__ == "__main__":
    labels_group()
