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

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
from PIL import Image

from worker.config import Settings

T = TypeVar("T")


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
    # Derived views of the photo shared between steps (see ``shared``); never stored.
    _derived: dict[Hashable, Any] = field(default_factory=dict, repr=False, compare=False)

    def shared(self, key: Hashable, make: Callable[[], T]) -> T:
        """``make()`` computed once per image and handed to every step that asks with the same
        ``key`` (e.g. a grey copy, a reduced copy). The value is shared, so callers must not
        modify it in place."""
        if key not in self._derived:
            self._derived[key] = make()
        value: T = self._derived[key]
        return value

    def reduced(self, max_side: int) -> tuple[Image.Image, tuple[float, float]]:
        """The photo with its longer side at most ``max_side`` (RGB, aspect kept), and the
        (x, y) scales applied; the photo itself when it already fits. Made once per size and
        shared: from the smallest copy already made that is at least this large, with Pillow's
        bilinear filter and ``reducing_gap=2`` (an integer box reduction first, then bilinear),
        so asking for 1024, 640 and 320 px costs about one pass over the full photo.
        Resampling from a reduced copy is not bit-identical to resampling the full photo:
        steps whose stored outputs must not change by a grey level keep their own resize."""
        width, height = self.image.size
        if max(width, height) <= max_side:
            return self.image, (1.0, 1.0)
        scale = max_side / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))

        def make() -> Image.Image:
            made = [img for key, img in self._derived.items()
                    if isinstance(key, tuple) and key[:1] == ("reduced",) and img.width >= size[0]
                    and img.height >= size[1]]
            source = min(made, key=lambda img: img.width, default=self.image)
            rgb_source = source if source.mode == "RGB" else source.convert("RGB")
            return rgb_source.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)

        copy = self.shared(("reduced", size), make)
        return copy, (size[0] / width, size[1] / height)

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
