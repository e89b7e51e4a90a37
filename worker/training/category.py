"""Category head: transfer learning on the stored tagging embeddings from reviewed labels.

Data: the active ``category`` labels (source review or import; a listing's label applies to
each of its images unless the image has its own) joined with the stored 1280-d embeddings of
the tagging step's backbone. Classes are the labels' categories, so a shop can have categories
the taxonomy lacks. The labels' fixed split decides train vs held-out; a validation slice of
the train split (never the held-out one) drives early stopping.

Model: one ``Linear(1280, n)`` on the L2-normalised embedding, class-weighted cross entropy,
Adam, full batch (a catalogue's labels fit in memory many times over). It is saved in the
format ``worker.steps.tagging.CategoryHead`` loads, so a promoted head is used as is.

The candidate and the current champion (or, without one, the zero-shot ImageNet-to-taxonomy
map as the tagging step recorded it: each image's best ``category-map`` tag) are scored on the
same held-out labels.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session
from tqdm import tqdm

from db import models as m
from worker.steps.tagging import CategoryHead

DIM = 1280
MIN_LABELS = 10  # below this a head is not worth training: the run is skipped with the reason


@dataclass
class Dataset:
    backbone: str
    classes: list[str]
    train_x: np.ndarray
    train_y: np.ndarray
    held_x: np.ndarray
    held_y: np.ndarray
    held_images: list[int]
    counts: dict[str, Any] = field(default_factory=dict)


def backbone_of(model_version: str) -> str:
    """The backbone part of a tagging version: ``efficientnet-lite0-imagenet@ab12+category-head@cd34``
    -> ``efficientnet-lite0-imagenet@ab12`` (a promoted head changes the step's version, not the
    embedding it stores)."""
    return model_version.split("+", 1)[0]


def category_targets(session: Session) -> dict[int, tuple[str, str]]:
    """image id -> (category, split) from the active reviewed/imported category labels. An
    image's own label wins over its listing's."""
    rows = session.execute(
        select(m.Label.image_id, m.Label.listing_id, m.Label.name, m.Label.split, m.Label.id)
        .where(m.Label.kind == "category", m.Label.active.is_(True), m.Label.source.in_(("review", "import")),
               m.Label.name.is_not(None))
        .order_by(m.Label.id)).all()
    targets: dict[int, tuple[str, str]] = {}
    listing_rows = [r for r in rows if r.image_id is None and r.listing_id is not None]
    if listing_rows:
        images = session.execute(select(m.Image.id, m.Image.listing_id).where(
            m.Image.listing_id.in_({r.listing_id for r in listing_rows}))).all()
        by_listing: dict[int, list[int]] = {}
        for image_id, listing_id in images:
            by_listing.setdefault(listing_id, []).append(image_id)
        for r in listing_rows:
            for image_id in by_listing.get(r.listing_id, []):
                targets[image_id] = (r.name, r.split)
    for r in rows:
        if r.image_id is not None:
            targets[r.image_id] = (r.name, r.split)
    return targets


def load_dataset(session: Session, targets: dict[int, tuple[str, str]] | None = None,
                 what: str = "category") -> Dataset | str:
    """The training data (``targets``: image id -> (class, split); default the category
    labels), or the reason there is none worth training on."""
    targets = category_targets(session) if targets is None else targets
    if not targets:
        return f"no reviewed {what} labels"
    rows = session.execute(select(m.Embedding.image_id, m.Embedding.model_version, m.Embedding.vector,
                                  m.Embedding.dim)
                           .where(m.Embedding.image_id.in_(list(targets)), m.Embedding.dim == DIM)
                           .order_by(m.Embedding.id)).all()
    if not rows:
        return f"{len(targets)} labelled images but none has a stored {DIM}-d embedding"
    backbone = Counter(backbone_of(r.model_version) for r in rows).most_common(1)[0][0]
    vectors: dict[int, np.ndarray] = {}
    for r in rows:
        if backbone_of(r.model_version) == backbone:
            vectors[r.image_id] = np.frombuffer(r.vector, dtype="<f4").astype(np.float32)
    classes = sorted({targets[i][0] for i in vectors})
    index = {c: k for k, c in enumerate(classes)}
    train = [(i, targets[i][0]) for i in sorted(vectors) if targets[i][1] != "heldout"]
    held = [(i, targets[i][0]) for i in sorted(vectors) if targets[i][1] == "heldout"]
    counts = {"labelled_images": len(targets), "with_embedding": len(vectors), "train": len(train),
              "heldout": len(held), "classes": len(classes), "backbone": backbone,
              "per_class": dict(Counter(targets[i][0] for i in vectors))}
    if len(train) < MIN_LABELS or not held or len(classes) < 2:
        return (f"too few labels: {len(train)} train / {len(held)} held-out images with embeddings "
                f"in {len(classes)} categories (need {MIN_LABELS} train, 1 held-out, 2 categories)")

    def stack(items: list[tuple[int, str]]) -> tuple[np.ndarray, np.ndarray]:
        return (np.stack([vectors[i] for i, _ in items]), np.array([index[c] for _, c in items], dtype=np.int64))

    tx, ty = stack(train)
    hx, hy = stack(held)
    return Dataset(backbone, classes, tx, ty, hx, hy, [i for i, _ in held], counts)


def train_head(x: np.ndarray, y: np.ndarray, n_classes: int, *, seed: int = 0, max_epochs: int = 400,
               patience: int = 40, val_share: float = 0.15,
               progress: bool = False, desc: str = "category") -> tuple[torch.nn.Linear, dict[str, Any]]:
    """Fit the head; early stopping on a validation slice of the train split (at least one
    example, only when there are enough), keeping the weights of the best validation loss."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    order = torch.randperm(len(x), generator=gen).numpy()
    n_val = int(len(x) * val_share) if len(x) >= 20 else 0
    val, fit = order[:n_val], order[n_val:]
    fx, fy = torch.from_numpy(x[fit]), torch.from_numpy(y[fit])
    vx, vy = torch.from_numpy(x[val]), torch.from_numpy(y[val])
    counts = torch.bincount(fy, minlength=n_classes).float()
    # Balanced class weights: a rare category counts as much as a common one in the loss.
    weights = torch.where(counts > 0, len(fy) / (n_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    head = torch.nn.Linear(DIM, n_classes)
    optim = torch.optim.Adam(head.parameters(), lr=0.05, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights)
    # The embeddings are unit vectors, so logits need large weights: scale the input instead of
    # waiting for Adam to grow them (the scale is folded into the saved weights below).
    scale = 16.0
    best: tuple[float, dict[str, torch.Tensor], int] | None = None
    epoch = 0
    for epoch in tqdm(range(1, max_epochs + 1), desc=desc, disable=not progress, unit="epoch"):
        head.train()
        optim.zero_grad()
        loss = loss_fn(head(fx * scale), fy)
        loss.backward()
        optim.step()
        head.eval()
        with torch.no_grad():
            monitor = float(torch.nn.functional.cross_entropy(head(vx * scale), vy)) if n_val else float(loss)
        if best is None or monitor < best[0] - 1e-5:
            best = (monitor, {k: v.clone() for k, v in head.state_dict().items()}, epoch)
        elif epoch - best[2] >= patience:
            break
    assert best is not None
    head.load_state_dict(best[1])
    with torch.no_grad():
        head.weight.mul_(scale)
    return head, {"epochs": epoch, "best_epoch": best[2], "monitor_loss": round(best[0], 4),
                  "validation_images": int(n_val)}


def evaluate(predicted: Sequence[str | None], truth: Sequence[str], classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class recall and the confusion matrix (rows true, columns predicted; a
    prediction outside ``classes`` counts in an extra "other" column)."""
    index = {c: k for k, c in enumerate(classes)}
    matrix = [[0] * (len(classes) + 1) for _ in classes]
    for p, t in zip(predicted, truth, strict=True):
        matrix[index[t]][index.get(p, len(classes)) if p is not None else len(classes)] += 1
    recall = {c: round(matrix[k][k] / max(1, sum(matrix[k])), 4) for k, c in enumerate(classes) if sum(matrix[k])}
    correct = sum(matrix[k][k] for k in range(len(classes)))
    return {"accuracy": round(correct / max(1, len(truth)), 4), "per_class_recall": recall,
            "heldout": len(truth), "confusion": matrix}


def head_predictions(head: torch.nn.Linear, classes: Sequence[str], x: np.ndarray) -> list[str]:
    with torch.no_grad():
        return [classes[i] for i in head(torch.from_numpy(x)).argmax(1).tolist()]


def zero_shot_predictions(session: Session, image_ids: Sequence[int]) -> list[str | None]:
    """What the taxonomy map said at analysis time: each image's best ``category-map`` tag."""
    best: dict[int, tuple[float, str]] = {}
    for image_id, name, score in session.execute(select(m.Tag.image_id, m.Tag.name, m.Tag.score).where(
            m.Tag.image_id.in_(list(image_ids)), m.Tag.source == "category-map")):
        if image_id is not None and (image_id not in best or score > best[image_id][0]):
            best[image_id] = (score, name)
    return [best[i][1] if i in best else None for i in image_ids]


def save_head(head: torch.nn.Linear, classes: Sequence[str], path: Path, **meta: Any) -> Path:
    """``CategoryHead.load`` format: ``{"state_dict", "classes"}`` (+ plain metadata)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {k: v.detach().clone() for k, v in head.state_dict().items()},
                "classes": list(classes), **meta}, path)
    return path


@dataclass
class CategoryOutcome:
    artifact: Path
    candidate: dict[str, Any]
    baseline: dict[str, Any]
    baseline_name: str  # "champion <version>" or "zero-shot taxonomy map"
    classes: list[str]
    counts: dict[str, Any]
    training: dict[str, Any]


def majority_predictions(data: Dataset) -> list[str | None]:
    """The baseline of a head with no champion and no zero-shot map (attribute heads): always
    the most common class of the train split."""
    top = int(np.bincount(data.train_y, minlength=len(data.classes)).argmax())
    return [data.classes[top]] * len(data.held_y)


def train_category(session: Session, out_dir: Path, champion_path: Path | None, *, seed: int = 0,
                   shuffle_labels: bool = False, progress: bool = False,
                   targets: dict[int, tuple[str, str]] | None = None, what: str = "category") -> CategoryOutcome | str:
    """Train a candidate head into ``out_dir`` and score it and the baseline on the held-out
    labels; a str is the reason nothing was trained. ``shuffle_labels`` trains on permuted
    targets (a deliberately worse candidate, for testing the promotion rule). With ``targets``
    (an attribute's labels) the baseline without a champion is the majority class instead of
    the zero-shot taxonomy map."""
    data = load_dataset(session, targets, what)
    if isinstance(data, str):
        return data
    y = data.train_y
    if shuffle_labels:
        y = np.random.default_rng(seed).permutation(y)
    started = time.monotonic()
    head, info = train_head(data.train_x, y, len(data.classes), seed=seed, progress=progress, desc=what)
    info["seconds"] = round(time.monotonic() - started, 2)
    truth = [data.classes[k] for k in data.held_y]
    candidate = evaluate(head_predictions(head, data.classes, data.held_x), truth, data.classes)
    baseline_pred: list[str | None]
    if champion_path is not None:
        champ = CategoryHead.load(champion_path)
        baseline_pred = [champ.scores(v)[0][0] for v in data.held_x]
        digest = champ.version.rsplit("@", 1)[1]
        baseline_name = f"champion {champ.version}" if targets is None else f"champion {what}@{digest}"
    elif targets is not None:
        baseline_pred = majority_predictions(data)
        baseline_name = "majority class"
    else:
        baseline_pred = zero_shot_predictions(session, data.held_images)
        baseline_name = "zero-shot taxonomy map"
    baseline = evaluate(baseline_pred, truth, data.classes)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    artifact = save_head(head, data.classes, out_dir / f"head-{stamp}-{seed}.pt", backbone=data.backbone)
    return CategoryOutcome(artifact, candidate, baseline, baseline_name, data.classes, data.counts, info)
