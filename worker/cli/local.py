"""Commands that work on the configured database directly: process, show, status, demo.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click

from worker.cli.common import IMAGE_SUFFIXES, allow_local, cli_settings, ensure_schema, setup_logging
from worker.cli.preflight import preflight_or_exit
from worker.pipeline.local import run_in_process


def _collect_images(paths: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """The image references to process, and the local files and folders they came from
    (resolved): what the operator named on the command line may be read, nothing else."""
    refs: list[str] = []
    given: list[str] = []
    for raw in paths:
        if raw.startswith(("http://", "https://")):
            refs.append(raw)
            continue
        if raw.startswith("file://"):
            from worker.io.errors import ImageLoadError
            from worker.io.local import file_url_path

            try:
                given.append(str(Path(file_url_path(raw)).resolve()))
            except ImageLoadError as exc:
                raise click.BadParameter(str(exc), param_hint="IMAGE_OR_DIR") from None
            refs.append(raw)
            continue
        path = Path(raw).expanduser().resolve()
        if path.is_dir():
            given.append(str(path))
            refs.extend(str(p) for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            given.append(str(path))
            refs.append(str(path))
        else:
            raise click.BadParameter(f"{raw} does not exist", param_hint="IMAGE_OR_DIR")
    if not refs:
        raise click.BadParameter("no images found (looked for " + ", ".join(sorted(IMAGE_SUFFIXES)) + ")")
    return refs, given


def process_summary(report: dict[str, Any], seconds: float) -> str:
    """One line for the end of `catalog process`: images done and failed (by failure code),
    the listing and its decision, and the time taken."""
    images = report["images"]
    done = [img for img in images if img["status"] == "done"]
    failed = [img for img in images if img["status"] == "failed"]
    incomplete = sum(img.get("complete") is False for img in done)
    codes = Counter((img.get("error") or "").partition(":")[0].strip() or "unknown" for img in failed)
    parts = [f"{len(done)} done" + (f" ({incomplete} analysed incompletely)" if incomplete else "")]
    if failed:
        parts.append(f"{len(failed)} failed (" + ", ".join(f"{code} {n}" for code, n in sorted(codes.items())) + ")")
    others = len(images) - len(done) - len(failed)
    if others:
        parts.append(f"{others} pending")
    listing = report["listing"]
    return (f"summary: {len(images)} image(s) in 1 listing ({listing['id']}, decision "
            f"{listing.get('fraud_decision') or '-'}) in {seconds:.1f} s: {', '.join(parts)}")


@click.command("process")
@click.argument("paths", nargs=-1, required=True)
@click.option("--seller", default="local", show_default=True, help="Seller id stored on the listing.")
@click.option("--category", default=None, help="Category the seller claimed.")
@click.option("--listing-id", default=None, help="Listing id (default: derived from the paths).")
@click.option("--title", default="", help="Listing title.")
@click.option("--json", "as_json", is_flag=True, help="Print the stored results as JSON.")
def process_cmd(paths: tuple[str, ...], seller: str, category: str | None, listing_id: str | None,
                title: str, as_json: bool) -> None:
    """Run the whole pipeline in this process on IMAGE_OR_DIR... (files, folders, URLs).

    Uses the configured database (default: embedded SQLite under .catalog/) and needs no
    broker. The files and folders named here may be read (besides CATALOG_FETCH_ALLOW_DIRS);
    a symlink in a folder that points outside it is refused. Running it again on unchanged
    files re-checks their bytes and keeps the results.

    Exit status: 0 when every image was fully analysed, 1 when an image failed or a step did
    not run on it (the report says which; without --json a line on stderr counts them).
    On a terminal a progress bar counts the images; at the end (without --json) a summary line
    on stderr gives images done and failed by code, the listing and the time taken.
    """
    from worker.reports.listing import listing_report, problems, render_report

    settings = cli_settings()
    setup_logging(settings)
    refs, given = _collect_images(paths)
    preflight_or_exit(settings)
    ensure_schema(settings)
    # The files and folders named here may be read; an event could never widen this.
    settings = allow_local(settings, given)
    started = time.monotonic()
    external_id = run_in_process(settings, refs, seller, category, listing_id, title)  # a bar on a TTY only
    report = listing_report(settings, external_id)
    click.echo(json.dumps(report, indent=2, default=str) if as_json else render_report(report))
    if not as_json:  # like the count below: --json output stays one JSON document, even mixed with stderr
        click.echo(process_summary(report, time.monotonic() - started), err=True)
    failed, incomplete, total = problems(report)
    if failed or incomplete:
        if not as_json:  # --json output stays one JSON document; the report has the statuses
            click.echo(f"catalog process: {failed} of {total} image(s) failed, {incomplete} analysed "
                       "incompletely", err=True)
        raise SystemExit(1)


@click.command("show")
@click.argument("listing_id")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def show_cmd(listing_id: str, as_json: bool) -> None:
    """Show what is stored for a listing (by the platform's listing id)."""
    from worker.reports.listing import listing_report, render_report

    settings = cli_settings()
    ensure_schema(settings)
    try:
        report = listing_report(settings, listing_id)
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(report, indent=2, default=str) if as_json else render_report(report))


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--inspect-timeout", type=click.FloatRange(0.1, 60), default=1.0, show_default=True,
              help="Seconds live workers get to answer (Redis broker).")
def status_cmd(as_json: bool, inspect_timeout: float) -> None:
    """Backlog and health: listings and images by status, failures by code, open flags by kind,
    images finished per minute (last 1/5/15 min) and the backlog's ETA, queue depths, the event
    stream's pending entries and lag, one count of dead-lettered events, the live workers with
    their queues, pool and concurrency, and a WARNING for every queue with work and no consumer."""
    from worker.reports.status import collect_status, render

    settings = cli_settings()
    ensure_schema(settings)
    status = collect_status(settings, inspect_timeout=inspect_timeout)
    click.echo(json.dumps(status, indent=2) if as_json else render(status))


@click.command("demo")
@click.option("--json", "as_json", is_flag=True, help="Print the stored results as JSON.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write the demo photos (default <data_dir>/demo-photos).")
def demo_cmd(as_json: bool, out: Path | None) -> None:
    """Process a few real photos that ship inside installed packages and show the results."""
    from worker.cli.demo import run_demo

    settings = cli_settings()
    setup_logging(settings)
    preflight_or_exit(settings)
    ensure_schema(settings)
    run_demo(settings, out or settings.data_dir / "demo-photos", as_json=as_json, echo=click.echo)
