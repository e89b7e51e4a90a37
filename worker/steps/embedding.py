"""Product-region embedding for visual search (step ``embedding``).

A shop photo shows the product on a table, in a room, held by a hand: the whole-photo embedding
of the tagging step mixes all of that in. This step embeds the product alone: it cuts the
product region out of the photo -- the segmentation step's foreground box, else the best
detection box -- with a small margin, and runs the same EfficientNet-Lite0 model as the tagging
step on the crop (same runtime, same weights, so ``full`` and ``region`` vectors live in one
space). It runs after ``segmentation`` and ``detection`` and reads their results; it needs
only ``tagging`` (whose model it shares). When neither found a region, it hands nothing over
and the image's ``region`` search vector is its ``full`` one.

The step is pure like every step: it hands the vector to the pipeline as
``StepResult.handoff`` (a float32 unit vector; not the ``embeddings`` table, which keeps one
tagging embedding per image for the duplicate check and training) and the store transaction
writes it to ``search_vectors`` (``worker.search.vectors.store_image_vectors``).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from PIL import Image

from worker.config import Settings
from worker.models.common import rgb
from worker.pipeline.contract import ImageContext, StepResult
from worker.steps.tagging import tagging_model

#: Version of the cropping rule (bump when region_box changes: old regions are recomputed).
REGION_RULE = "region-crop@1"
#: Fraction of the box's size added on each side (context helps the backbone).
MARGIN = 0.08
#: A box smaller than this fraction of the photo's area is not the product shot.
MIN_AREA = 0.02
#: A box covering more than this fraction of the photo is the photo: nothing to crop.
MAX_AREA = 0.9
MIN_SIDE = 16


def region_box(results: dict[str, StepResult], size: tuple[int, int]) -> tuple[tuple[int, int, int, int], str] | None:
    """The product region in photo pixels (x0, y0, x1, y1, margin added, clipped) and where it
    came from (``segmentation`` | ``detection``), or None when there is none worth cropping."""
    width, height = size
    candidates: list[tuple[tuple[float, float, float, float], str]] = []
    seg = results.get("segmentation")
    if seg is not None and seg.data.get("box"):
        x0, y0, x1, y1 = (float(v) for v in seg.data["box"])
        candidates.append(((x0, y0, x1, y1), "segmentation"))
    det = results.get("detection")
    if det is not None and det.detections:
        best = max(det.detections, key=lambda d: d.score)
        candidates.append((best.box, "detection"))
    for (x0, y0, x1, y1), source in candidates:
        area = max(0.0, x1 - x0) * max(0.0, y1 - y0) / max(1, width * height)
        if not MIN_AREA <= area <= MAX_AREA:
            continue
        mx, my = (x1 - x0) * MARGIN, (y1 - y0) * MARGIN
        box = (max(0, int(x0 - mx)), max(0, int(y0 - my)), min(width, int(round(x1 + mx))),
               min(height, int(round(y1 + my))))
        if box[2] - box[0] >= MIN_SIDE and box[3] - box[1] >= MIN_SIDE:
            return box, source
    return None


def embed_region(image: Image.Image, box: tuple[int, int, int, int], settings: Settings) -> np.ndarray:
    """The tagging backbone's unit embedding of ``image`` cropped to ``box``."""
    crop = rgb(image).crop(box)
    return np.asarray(tagging_model(settings).infer(crop).embedding, dtype=np.float32)


class EmbeddingStep:
    name: ClassVar[str] = "embedding"
    requires: ClassVar[tuple[str, ...]] = ("tagging",)

    def version(self, settings: Settings) -> str:
        return f"{tagging_model(settings).version}+{REGION_RULE}"

    def run(self, ctx: ImageContext) -> StepResult:
        found = region_box(ctx.results, ctx.image.size)
        if found is None:
            return StepResult(data={"region": None, "source": None})
        box, source = found
        vector = embed_region(ctx.image, box, ctx.settings)
        return StepResult(data={"region": list(box), "source": source}, handoff=vector)
