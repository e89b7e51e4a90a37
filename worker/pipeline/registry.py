"""The step registry and the runner that applies the configured steps to one image.
"""

from __future__ import annotations

import importlib
import logging
import time

from worker.config import Settings
from worker.pipeline.contract import ImageContext, Step, StepRun, StepUnavailable

log = logging.getLogger(__name__)


# name -> "module:Class". Steps are imported lazily so a worker only loads what it runs.
STEP_REGISTRY: dict[str, str] = {
    # fraud checks (issue 5, worker/fraud/)
    "duplicates": "worker.fraud.duplicates:DuplicatesStep",
    "contact_info": "worker.fraud.contact:ContactInfoStep",
    "nsfw": "worker.fraud.nsfw:NsfwStep",
    "tamper": "worker.fraud.tamper:TamperStep",
    "category": "worker.fraud.category:CategoryStep",
    "quality": "worker.fraud.quality:QualityStep",
    "metadata": "worker.steps.metadata:MetadataStep",
    "superres": "worker.steps.superres:SuperResStep",
    "tagging": "worker.steps.tagging:TaggingStep",
    "detection": "worker.steps.detection:DetectionStep",
    "segmentation": "worker.steps.segmentation:SegmentationStep",
}


_instances: dict[str, Step] = {}


def get_step(name: str) -> Step:
    """One instance per process, so models load once per worker process."""
    if name not in _instances:
        try:
            target = STEP_REGISTRY[name]
        except KeyError:
            raise ValueError(
                f"unknown step {name!r}; known steps: {', '.join(sorted(STEP_REGISTRY))}"
            ) from None
        module_name, _, class_name = target.partition(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        _instances[name] = cls()
    return _instances[name]


def validate_steps(names: list[str]) -> None:
    for name in names:
        if name not in STEP_REGISTRY:
            raise ValueError(f"unknown step {name!r}; known steps: {', '.join(sorted(STEP_REGISTRY))}")


def run_steps(ctx: ImageContext, names: list[str]) -> list[StepRun]:
    """Run the configured steps in order. A failing or unavailable step is recorded and the
    next one still runs; steps whose requirements did not succeed are skipped."""
    runs: list[StepRun] = []
    for name in names:
        step = get_step(name)
        missing = [req for req in step.requires if req not in ctx.results]
        if missing:
            runs.append(
                StepRun(name, _safe_version(step), "skipped", 0.0,
                        error=f"needs {', '.join(missing)}, which did not produce a result")
            )
            continue
        started = time.perf_counter()
        try:
            result = step.run(ctx)
        except StepUnavailable as exc:
            runs.append(StepRun(name, _safe_version(step), "unavailable",
                                _ms_since(started), error=str(exc)))
            log.warning("step %s unavailable: %s", name, exc)
            continue
        except Exception as exc:  # one broken step must not lose the others' output
            log.exception("step %s failed on image %s", name, ctx.image_id)
            runs.append(StepRun(name, _safe_version(step), "failed", _ms_since(started),
                                error=f"{type(exc).__name__}: {exc}"))
            continue
        ctx.results[name] = result
        runs.append(StepRun(name, step.version(ctx.settings), "ok", _ms_since(started), result=result))
    return runs


def _safe_version(step: Step, settings: Settings) -> str:
    try:
        return step.version(settings)
    except Exception:  # a step whose model is missing may not know its version
        return "unknown"


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
