"""`catalog retrain --now`: the periodic retrain, in the foreground."""

from __future__ import annotations

import json
import sys

import click

from worker.cli.common import cli_settings, ensure_schema


@click.command("retrain")
@click.option("--now", is_flag=True, required=True,
              help="Run the retrain here and now (beat runs it on CATALOG_RETRAIN_SCHEDULE).")
@click.option("--what", "what", multiple=True, type=click.Choice(["category", "fraud", "attribute", "detector"]),
              help="What to retrain (repeatable; default: category, fraud and attribute heads).")
@click.option("--json", "as_json", is_flag=True, help="Print the run reports as JSON.")
def retrain_cmd(now: bool, what: tuple[str, ...], as_json: bool) -> None:
    """Retrain from the reviewed labels, compare each candidate with its champion on the
    held-out labels, and promote it only if better by CATALOG_PROMOTE_MARGIN. Exits 0 when
    another retrain holds the lock (that one does the work), 1 when a run failed."""
    from worker.training.retrain import run_retrain

    settings = cli_settings()
    ensure_schema(settings)
    reports = run_retrain(settings, list(what) or None, progress=sys.stderr.isatty())
    if reports is None:
        click.echo("another retrain is running; nothing done")
        return
    if as_json:
        click.echo(json.dumps([{"what": r.what, "decision": r.decision, "reason": r.reason, "run": r.run_id,
                                "version": r.version, "candidate": _brief(r.candidate),
                                "baseline": _brief(r.baseline), "baseline_name": r.baseline_name}
                               for r in reports], indent=2))
    else:
        for r in reports:
            click.echo(f"{r.what:9} {r.decision:9} run {r.run_id} {r.version or ''}")
            click.echo(f"          {r.reason}")
    if any(r.decision == "failed" for r in reports):
        raise SystemExit(1)


def _brief(metrics: dict[str, object] | None) -> dict[str, object] | None:
    if metrics is None:
        return None
    return {k: metrics[k] for k in ("accuracy", "per_class_recall", "log_loss", "auc", "ece", "heldout")
            if k in metrics}
