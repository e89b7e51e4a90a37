"""The analysis-step contract.

Every capability (metadata, tagging, detection, segmentation, super-resolution, fraud
checks) is one module exposing a class that satisfies :class:`Step`. A step receives the
decoded image plus what earlier steps produced, and returns a :class:`StepResult`; it never
touches the database (this module does not even import it) and runs while no database
transaction is open. Storing results, idempotency and transactions live in
``worker.pipeline`` (``analyze``, ``store``), so adding a capability is a matter of adding a
module and naming it in ``STEP_REGISTRY`` (and ``CATALOG_STEPS``).

A step whose result needs more than the generic rows (tags, detections, flags, artifacts,
embedding, ``step_runs``), or needs to look at what is already stored (the duplicate search),
hands what it computed to a ``ResultWriter`` (``worker.pipeline.writers``) through
:attr:`StepResult.handoff`; the writer runs inside the transaction that stores the image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
from PIL import Image

from worker.config import Settings


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
    # In-memory input for the step's ResultWriter (worker/pipeline/writers.py), e.g. the
    # duplicate step's query hashes; never stored as such. None for steps without a writer.
    handoff: Any = None


@dataclass
class ImageContext:
    """What a step sees: one decoded RGB image and its listing. No database session: steps
    run between the transaction that claims the image and the one that stores its results."""

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

    @property
    def artifact_dir(self) -> Path:
        path = self.settings.effective_artifact_dir / f"{self.image_id // 1000:04d}"
        path.mkdir(parents=True, exist_ok=True)
        return path


class Step(Protocol):
    name: ClassVar[str]
    # Names of steps whose results this step reads from ctx.results.
    requires: ClassVar[tuple[str, ...]]

    def version(self, settings: Settings) -> str:
        """Model name and weights digest under these settings, recorded with every output
        (e.g. 'yolov3-tiny-coco@1a2b3c4d'). May raise StepUnavailable."""
        ...

    def run(self, ctx: ImageContext) -> StepResult: ...


@dataclass
class StepRun:
    """What happened when one step ran on one image."""

    step: str
    version: str
    status: str  # ok | unavailable | failed | skipped
    duration_ms: float
    result: StepResult | None = None
    error: str | None = None
