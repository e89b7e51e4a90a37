"""`catalog backfill --model NAME`: re-analyse images analysed with an older model version."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from datetime import datetime

import click

from worker.cli.common import cli_settings, ensure_schema


def _rate(value: str | None) -> float | None:
    if value is None:
        return None
    number = value.removesuffix("/s")
    try:
        rate = float(number)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected items per second, e.g. 2 or 0.5/s") from None
    if rate <= 0:
        raise click.BadParameter(f"{value!r}: must be above 0")
    return rate


@click.command("backfill")
@click.option("--model", "model", required=True,
              help="category-head, attribute-head-<name>, fraud-scorer, or a step name.")
@click.option("--since", type=click.DateTime(), default=None,
              help="Only images (listings for fraud-scorer) processed at or after this time (UTC).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many in this run.")
@click.option("--rate", "rate", default=None, metavar="N[/s]", help="At most N images (listings) per second.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def backfill_cmd(model: str, since: datetime | None, limit: int | None, rate: str | None, as_json: bool) -> None:
    """Analyse again, through the normal pipeline, the images whose step for MODEL ran with an
    older version than the current one (after a promotion or rollback); for fraud-scorer,
    recompute the finished listings' fraud scores. Resumable: a second run continues after the
    last image done (cursor in <data_dir>/backfill/). Exits 1 when some image failed."""
    from worker.training.backfill import BackfillError, backfill

    settings = cli_settings()
    ensure_schema(settings)
    try:
        report = backfill(settings, model, since=since, limit=limit, rate=_rate(rate),
                          progress=sys.stderr.isatty())
    except BackfillError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(asdict(report), indent=2))
    else:
        what = "listings re-scored" if report.step is None else f"images re-analysed ({report.step} step)"
        click.echo(f"backfill {model} -> {report.target}: {report.done} {what}, {report.failed} failed, "
                   f"{report.skipped} skipped; cursor {report.cursor}"
                   + ("; more left (run again to continue)" if report.remaining else ""))
    if report.failed:
        raise SystemExit(1)
