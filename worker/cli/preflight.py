"""Start-up checks: a setting that cannot work stops `catalog worker`, `ingest`, `api`,
`process` and `demo` before they accept work, with one sentence naming the variable.

Pure value checks (names, files, URLs) are the settings' own validators (worker/config.py);
this module adds what needs the machine or the step registry: the CUDA device, and every
configured step's model files. Nothing is loaded: a step's ``version(settings)`` only hashes
the weight files its model would load (and raises ``StepUnavailable`` naming the missing
package or file), so the check costs seconds, not model loads.
"""

from __future__ import annotations

import os

from worker.config import ENV_PREFIX, ConfigError, Settings


class PreflightError(ConfigError):
    """A setting that validates but cannot work on this machine or installation."""


def cuda_available() -> bool:
    """CUDA visibility without creating a CUDA context in this (possibly forking) parent."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return bool(torch.cuda.is_available())


def check_device(settings: Settings, cuda: bool | None = None) -> None:
    if settings.device != "cuda":
        return
    if not (cuda_available() if cuda is None else cuda):
        raise PreflightError(
            f"{ENV_PREFIX}DEVICE=cuda but no CUDA device is visible (no NVIDIA driver/GPU, or "
            f"CUDA_VISIBLE_DEVICES hides it): use {ENV_PREFIX}DEVICE=auto or cpu")


def check_steps(settings: Settings) -> None:
    """Every configured step can build its model: its package and weight files are installed."""
    from worker.pipeline.contract import StepUnavailable
    from worker.pipeline.registry import get_step, validate_steps

    try:
        validate_steps(settings.steps)
    except ValueError as exc:
        raise PreflightError(f"{ENV_PREFIX}STEPS: {exc}") from None
    for name in settings.steps:
        try:
            get_step(name).version(settings)
        except (StepUnavailable, OSError, ValueError) as exc:
            reason = str(exc)
            if name == "superres":  # its own message names no variable or folder
                reason += (f": {ENV_PREFIX}SR_MODEL={settings.sr_model} has no weights in "
                           f"{settings.effective_sr_model_dir} (`catalog models import` or `catalog train sr`)")
            raise PreflightError(
                f"{ENV_PREFIX}STEPS: step {name!r} cannot run: {reason} (fix that, or leave "
                f"{name!r} out of {ENV_PREFIX}STEPS)") from None


def preflight(settings: Settings, models: bool = True, cuda: bool | None = None) -> None:
    """All start-up checks; ``models=False`` for processes that run no model (ingest, api,
    a worker on the ingest or train queue only): the device and the weights do not concern
    them, and a deployment shares one environment between CPU and GPU hosts. The webhook
    target is checked for every process."""
    check_webhook(settings)
    if not models:
        return
    check_device(settings, cuda)
    check_steps(settings)


def check_webhook(settings: Settings) -> None:
    """CATALOG_WEBHOOK_URL whose address the fetch fence refuses: every event would only be
    dead-lettered, so start-up stops (a host that does not resolve now is not refused)."""
    from worker.outbound.webhook import check_target

    problem = check_target(settings)
    if problem:
        raise PreflightError(problem)


def preflight_or_exit(settings: Settings, runs_models: bool = True) -> None:
    """:func:`preflight` for a command: a failed check is a one-sentence click error."""
    import click

    try:
        preflight(settings, models=runs_models)
    except PreflightError as exc:
        raise click.ClickException(str(exc)) from None
