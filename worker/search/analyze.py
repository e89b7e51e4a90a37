"""Analyse one photo that is not part of any listing: ``POST /api/v1/analyze`` (what is this,
what colour, where is it), ``POST /api/v1/search/image`` and ``catalog similar FILE|URL`` (the
query vector of a photo).

The photo goes through the same code as a listing photo: the same decoder and limits
(``CATALOG_FETCH_MAX_BYTES``, ``CATALOG_MAX_PIXELS``, sniffed formats, EXIF orientation), and
the configured steps among :data:`ANALYZE_STEPS` run by the pipeline's own runner
(``worker.pipeline.registry.run_steps``) with the process-wide models. Nothing is stored: no
database session exists here, and the files a step writes (the segmentation cutout) go to a
temporary directory that is removed before the answer is returned. A step whose model is
missing is reported ``unavailable`` and contributes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worker.config import Settings
from worker.io.decode import decode_image
from worker.io.errors import ImageLoadError, too_large_error
from worker.io.load import LoadedImage, load_image
from worker.pipeline.contract import ImageContext, StepRun
from worker.pipeline.registry import run_steps
from worker.search.tags import Vocabulary, vocabulary
from worker.search.vectors import vectors_from_runs

# onnxruntime must be loaded before usearch (the embedded search index) in a process that does
# both, as `catalog api` does: with usearch 2.26 loaded first, running an onnxruntime session
# (the U2-Netp segmenter) crashes the process in libstdc++ (segfault). Importing it here, before
# any query can load usearch, keeps the order right.
with contextlib.suppress(ImportError):
    import onnxruntime  # noqa: F401

#: Steps that describe a photo (category and labels, boxes, colours, the product-region
#: vector), in pipeline order. Fraud checks, super-resolution and the thumbnail are the
#: worker's business; the duplicate search needs stored listings.
ANALYZE_STEPS = ("tagging", "detection", "segmentation", "embedding")


class AnalyzeError(ValueError):
    """The photo could not be analysed; ``code`` says why (an :class:`ImageLoadError` code, or
    ``no_vector`` when no step produced a search vector)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Analysis:
    """What the steps found in one photo, ready for JSON (``to_dict``)."""

    width: int
    height: int
    format: str
    sha256: str
    size_bytes: int
    category: dict[str, Any] | None
    tags: list[dict[str, Any]]
    colours: list[dict[str, Any]]
    boxes: list[dict[str, Any]]
    product_box: list[float] | None
    steps: list[dict[str, Any]]
    vectors: dict[str, tuple[np.ndarray, str]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"width": self.width, "height": self.height, "format": self.format, "sha256": self.sha256,
                "size_bytes": self.size_bytes, "category": self.category, "tags": self.tags,
                "colours": self.colours, "boxes": self.boxes, "product_box": self.product_box,
                "steps": self.steps}

    def vector(self, kind: str) -> tuple[np.ndarray, str]:
        """The query vector of ``kind`` (``region`` or ``full``) and its backbone version."""
        if kind not in self.vectors:
            why = "; ".join(f"{s['step']} {s['status']}" + (f" ({s['error']})" if s.get("error") else "")
                            for s in self.steps) or "no analysis step is configured"
            raise AnalyzeError("no_vector", f"no search vector could be computed for this photo: {why}")
        return self.vectors[kind]


def decode_upload(data: bytes, settings: Settings, name: str = "the upload") -> LoadedImage:
    """Bytes a client sent -> the decoded photo, under the limits listing photos have."""
    if len(data) > settings.fetch_max_bytes:
        raise too_large_error(name, len(data), settings.fetch_max_bytes)
    if not data:
        raise ImageLoadError("not_an_image", f"{name} is empty")
    try:
        image, fmt = decode_image(data, settings)
    except ImageLoadError as exc:
        raise ImageLoadError(exc.code, f"{name}: {exc.message}", status=exc.status) from None
    return LoadedImage(image=image, raw=data, format=fmt, sha256=hashlib.sha256(data).hexdigest(),
                       width=image.width, height=image.height, size_bytes=len(data))


def load_reference(ref: str, settings: Settings) -> LoadedImage:
    """A local file or URL through the hardened loader (allowed dirs and hosts, limits)."""
    return load_image(ref, settings)


def analyze_steps(settings: Settings) -> list[str]:
    return [name for name in settings.steps if name in ANALYZE_STEPS]


def analyze_photo(photo: LoadedImage, settings: Settings, *, steps: list[str] | None = None) -> Analysis:
    """Run the describing steps on ``photo``; nothing is stored anywhere."""
    names = analyze_steps(settings) if steps is None else steps
    with tempfile.TemporaryDirectory(prefix="catalog-analyze-") as scratch:
        scoped = settings.model_copy(update={"artifact_dir": Path(scratch)})
        ctx = ImageContext(image_id=0, listing_id=0, seller_id="", category=None, url="upload",
                           image=photo.image, raw=photo.raw, source_format=photo.format, sha256=photo.sha256,
                           settings=scoped)
        runs = run_steps(ctx, names)
    return summarise(photo, runs, vocabulary(settings))


def _zh(vocab: Vocabulary, english: str) -> dict[str, str]:
    """The name shoppers see in each language of the taxonomy (``{"zh-CN": "红色"}``)."""
    return vocab.translations(english)


def summarise(photo: LoadedImage, runs: list[StepRun], vocab: Vocabulary) -> Analysis:
    results = {run.step: run.result for run in runs if run.status == "ok" and run.result is not None}
    tags = [{"name": t.name, "score": t.score, "source": t.source, "names": _zh(vocab, t.name)}
            for result in results.values() for t in result.tags]
    category = None
    if "tagging" in results:
        found = results["tagging"].data.get("category")
        if found:
            category = {**found, "names": _zh(vocab, str(found["name"]))}
    colours, product_box = [], None
    if "segmentation" in results:
        data = results["segmentation"].data
        colours = [{**c, "names": _zh(vocab, str(c["name"]))} for c in data.get("colours") or []]
        product_box = data.get("box")
    boxes = [{"label": d.label, "score": d.score, "box": list(d.box), "names": _zh(vocab, d.label)}
             for result in results.values() for d in result.detections]
    steps = [{"step": r.step, "status": r.status, "version": r.version, "duration_ms": r.duration_ms,
              **({"error": r.error} if r.error else {})} for r in runs]
    return Analysis(photo.width, photo.height, photo.format, photo.sha256, photo.size_bytes, category, tags,
                    colours, boxes, product_box, steps, vectors_from_runs(runs))
