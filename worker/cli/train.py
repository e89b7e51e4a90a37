"""`catalog train`: train the models the project owns."""

from __future__ import annotations

import json
from pathlib import Path

import click

from worker.config import get_settings


@click.group("train")
def train() -> None:
    """Train project-owned models (self-supervised or from reviewed labels)."""


@train.command("sr")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--scale", type=click.Choice(["2", "4"]), default="2", show_default=True)
@click.option("--steps", type=int, default=3000, show_default=True, help="Optimiser steps.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--patch", type=int, default=64, show_default=True, help="High-res patch side, pixels.")
@click.option("--holdout", type=float, default=0.2, show_default=True,
              help="Fraction (or count, if >= 1) of the photos kept out of training for evaluation.")
@click.option("--eval-every", type=int, default=1000, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder (default CATALOG_SR_MODEL_DIR); the `inhouse` SR model is read from there.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto = cuda when torch sees a GPU, else cpu (like CATALOG_DEVICE).")
@click.option("--seed", type=int, default=0, show_default=True)
def train_sr_cmd(images: tuple[str, ...], scale: str, steps: int, batch_size: int, patch: int,
                 holdout: float, eval_every: int, out: str | None, device: str, seed: int) -> None:
    """Train the compact in-house super-resolution model on IMAGES (files or folders of
    high-resolution catalog photos), degraded on the fly by downscaling, blur, noise and JPEG.
    Prints progress, keeps the best checkpoint by held-out PSNR, writes metrics JSON.
    Ctrl-C stops early and keeps the best checkpoint so far (it says where)."""
    from worker.models.backends import resolve_device
    from worker.observe.progress import show_progress
    from worker.training.sr import list_images, train_sr

    try:
        device = str(resolve_device(device))
    except RuntimeError:
        raise click.BadParameter("cuda: torch sees no CUDA device (use auto or cpu)", param_hint="--device") from None
    paths: list[Path] = []
    for item in images:
        paths.extend(list_images(item))
    target = out or str(get_settings().effective_sr_model_dir)
    try:
        metrics = train_sr(paths, target, scale=int(scale), steps=steps, batch_size=batch_size, patch=patch,
                           holdout=holdout if holdout < 1 else int(holdout), eval_every=eval_every,
                           device=device, seed=seed, progress=show_progress())  # a bar only on a terminal
    except KeyboardInterrupt:
        click.echo("train sr: interrupted before the first step; nothing saved", err=True)
        raise SystemExit(130) from None
    click.echo(json.dumps(metrics, indent=2, default=str))
    stopped = metrics.get("interrupted_at_step")
    if stopped is not None:
        best = metrics["best"]
        click.echo(f"train sr: interrupted at step {stopped} of {steps}; the best checkpoint so far (step "
                   f"{best['step']}, PSNR-Y {best['psnr']:.2f} dB) is saved at {metrics['checkpoint']}", err=True)
        raise SystemExit(130)
