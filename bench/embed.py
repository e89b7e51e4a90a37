"""Bench image embedder: the tagging step's own model (EfficientNet-Lite0, 1280-d pooled
features, same preprocessing), so the duplicate bench re-checks with production vectors."""

from __future__ import annotations

import numpy as np
from PIL import Image

from worker.steps.tagging import EfficientNetLite0


class Embedder:
    def __init__(self, device: str = "cpu") -> None:
        self.model = EfficientNetLite0(device=device, torch_threads=1)

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        return np.stack([out.embedding for out in self.model.predict_batch(images)])
