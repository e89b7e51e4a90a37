"""Helpers the models share: image-to-tensor conversion, bounded resizing, letterboxing and
torchvision checkpoints. (Weight files and digests: :mod:`worker.models.weights`;
onnxruntime sessions: :mod:`worker.models.backends`; both re-exported here.)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from worker.models.backends import onnx_session
from worker.models.weights import ModelUnavailable, file_digest, package_file

__all__ = ["file_digest", "fit_within", "letterbox", "onnx_session", "package_file", "pad_to_aspect",
           "resample_uint8", "rgb", "tensor_image", "to_tensor", "to_uint8_tensor", "torchvision_checkpoint"]


def rgb(image: Image.Image) -> Image.Image:
    """``image`` in RGB mode, without the full-size copy ``convert("RGB")`` makes of an image
    that already is RGB (a 49 MP photo is 147 MB)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def fit_within(image: Image.Image, max_side: int,
               resample: Image.Resampling = Image.Resampling.BILINEAR,
               ) -> tuple[Image.Image, tuple[float, float]]:
    """Downscale so that the longer side is at most ``max_side`` (aspect kept, every side at
    least 1 px). Returns the image and the (x, y) scales applied: (1.0, 1.0) when it already
    fits, and then the image itself, not a copy."""
    width, height = image.size
    if max(width, height) <= max_side:
        return image, (1.0, 1.0)
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, resample, reducing_gap=3.0), (size[0] / width, size[1] / height)


def pad_to_aspect(image: Image.Image, max_aspect: float, fill: int = 127) -> Image.Image:
    """Pad the right or bottom edge so that the longer side is at most ``max_aspect`` times
    the shorter one (a 1 x 2000 strip becomes 500 x 2000 at aspect 4). Content keeps its
    pixel coordinates; an image that already fits is returned as is."""
    width, height = image.size
    if max(width, height) <= max_aspect * min(width, height):
        return image
    size = (max(width, math.ceil(height / max_aspect)), max(height, math.ceil(width / max_aspect)))
    canvas = Image.new("RGB", size, (fill, fill, fill))
    canvas.paste(rgb(image), (0, 0))
    return canvas


def resample_uint8(image: Image.Image, size: tuple[int, int], mode: str = "bilinear",
                   box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """``image`` (or its integer ``box``) resampled to ``size`` (width, height): a (3, H, W)
    uint8 tensor, RGB.

    The same antialiased filters as Pillow's ``Image.resize`` with ``BILINEAR`` / ``BICUBIC``
    (``mode``), computed by torch's uint8 kernels (a port of Pillow-SIMD's) when both sides
    shrink: the fixed-point rounding differs by a grey level on ~0.1-0.5 % of the pixels (up to
    4 levels at slight reductions such as 512 -> 416 px, under 0.05 on average), for 3-4x less
    CPU per photo. A photo enlarged on either side
    (smaller than the model input) takes Pillow's own resize. Runs on torch's intra-op
    threads (``CATALOG_TORCH_THREADS``)."""
    width, height = (box[2] - box[0], box[3] - box[1]) if box is not None else image.size
    if size[0] > width or size[1] > height:  # enlarging: torch's kernels drift from Pillow's there
        resample = Image.Resampling.BICUBIC if mode == "bicubic" else Image.Resampling.BILINEAR
        return to_uint8_tensor(rgb(image).resize(size, resample, box=box))
    pixels = np.asarray(rgb(image))
    with warnings.catch_warnings():
        # Pillow hands out read-only arrays; torch warns about those, and nothing writes here.
        warnings.simplefilter("ignore", UserWarning)
        source = torch.from_numpy(pixels)
    if box is not None:
        source = source[box[1]:box[3], box[0]:box[2]]
    batch = source.permute(2, 0, 1).unsqueeze(0)  # channels-last strides: torch's fast uint8 path
    if (batch.shape[3], batch.shape[2]) == tuple(size):
        return batch[0].contiguous()
    out = torch.nn.functional.interpolate(batch, size=(size[1], size[0]), mode=mode, antialias=True,
                                          align_corners=False)
    return out[0]


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a (3, H, W) uint8 tensor (a copy)."""
    return torch.from_numpy(np.array(rgb(image), dtype=np.uint8)).permute(2, 0, 1)


def tensor_image(tensor: torch.Tensor) -> Image.Image:
    """A (3, H, W) uint8 tensor as an RGB Pillow image (planes interleaved by OpenCV's
    ``merge``: ~25x faster than a strided copy of the transposed tensor)."""
    import cv2  # a project dependency (opencv-python-headless); imported where it is used

    planes = tensor.contiguous().numpy()
    return Image.fromarray(cv2.merge([planes[0], planes[1], planes[2]]), "RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [0, 255]."""
    array = np.array(rgb(image), dtype=np.float32)  # a fresh, writable array
    return torch.from_numpy(array).permute(2, 0, 1)


def letterbox(image: Image.Image, size: int, fill: int = 127) -> tuple[Image.Image, float, tuple[int, int]]:
    """Fit ``image`` into a ``size`` x ``size`` square keeping its aspect ratio.

    Returns the padded image, the scale applied and the (left, top) padding, which map a
    point back to the original as ``(x - left) / scale``.
    """
    width, height = image.size
    scale = min(size / width, size / height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = rgb(image).resize((new_w, new_h), Image.Resampling.BILINEAR)
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
