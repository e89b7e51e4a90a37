"""The analysis-step contract.

Every capability (metadata, tagging, detection, segmentation, super-resolution, fraud
checks) is one module exposing a class that satisfies :class:`Step`. A step receives the
decoded image plus what earlier steps produced, and returns a :class:`StepResult`; it never
touches the database. Persisting results, idempotency and transactions live in
``worker.processing`` so that adding a capability is a matter of adding a module and naming
it in ``STEP_REGISTRY`` (and ``CATALOG_STEPS``).
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
from PIL import Image
from sqlalchemy.orm import Session

from worker.config import Settings

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
    "metadata": "worker.metadata:MetadataStep",
    "superres": "worker.superres:SuperResStep",  # issue 4
    "tagging": "worker.tagging:TaggingStep",
    "detection": "worker.detect:DetectionStep",
    "segmentation": "worker.segment:SegmentationStep",
}


class StepUnavailable(Exception):
    """The step cannot run here (e.g. its model weights are not installed).

    Recorded as status ``unavailable`` with this message; the image is not failed and
    nothing is invented in its place.
    """


@dataclass(frozen=True)
class Tag:
    name: str
    score: float
    source: str  # e.g. "imagenet-map", "detection", "colour", "category-head"


@dataclass(frozen=True)
class Detection:
    label: str
    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in original-image pixels


@dataclass(frozen=True)
class Flag:
    kind: str  # duplicate_image, contact_info, nsfw, tampered, category_mismatch, low_quality
    score: float
    evidence: dict[str, Any]


@dataclass(frozen=True)
class Artifact:
    kind: str  # "cutout", "superres", ...
    path: Path
    width: int | None = None
    height: int | None = None


@dataclass
class StepResult:
    tags: list[Tag] = field(default_factory=list)
    detections: list[Detection] = field(default_factory=list)
    flags: list[Flag] = field(default_factory=list)
    artifacts: list[Artifact] = field(default_factory=list)
    # One embedding per step at most, stored in the `embeddings` table.
    embedding: np.ndarray | None = None
    # JSON-serialisable summary, stored in step_runs.output (shown by `catalog process`).
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class ImageContext:
    """What a step sees: one decoded RGB image and its listing."""

    image_id: int
    listing_id: int
    seller_id: str
    category: str | None
    url: str
    image: Image.Image  # RGB, EXIF orientation applied
    raw: bytes  # the bytes as fetched (for EXIF, JPEG-level checks)
    source_format: str  # JPEG, PNG, ...
    sha256: str
    settings: Settings
    results: dict[str, StepResult] = field(default_factory=dict)
    # The session of the transaction that will store this image's results. Steps may READ
    # through it (e.g. duplicate search); writes belong in the optional ``persist`` hook.
    db: Session | None = None

    @property
    def artifact_dir(self) -> Path:
        path = self.settings.effective_artifact_dir / f"{self.image_id // 1000:04d}"
        path.mkdir(parents=True, exist_ok=True)
        return path


class Step(Protocol):
    name: ClassVar[str]
    # Names of steps whose results this step reads from ctx.results.
    requires: ClassVar[tuple[str, ...]]

    @property
    def version(self) -> str:
        """Model name and version, recorded with every output (e.g. 'yolov3-tiny-coco@1')."""
        ...

    def run(self, ctx: ImageContext) -> StepResult: ...

    # Optional: ``def persist(self, session, image_row, result) -> None`` writes rows a step
    # owns beyond tags/detections/flags/artifacts/embedding (e.g. hash band index rows). It is
    # called inside the image's transaction, after the image's previous rows were deleted.


@dataclass
class StepRun:
    """What happened when one step ran on one image."""

    step: str
    version: str
    status: str  # ok | unavailable | failed | skipped
    duration_ms: float
    result: StepResult | None = None
    error: str | None = None


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
        runs.append(StepRun(name, step.version, "ok", _ms_since(started), result=result))
    return runs


def _safe_version(step: Step) -> str:
    try:
        return step.version
    except Exception:  # a step whose model is missing may not know its version
        return "unknown"


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
