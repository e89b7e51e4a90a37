"""Train the in-house super-resolution model (:class:`worker.superres.CompactSR`).

Self-supervised: the targets are crops of real high-resolution photos, the inputs are the
same crops degraded the way catalog uploads are (slight blur, downscale, sensor noise, JPEG).
Half of the inputs are clean bicubic downscales so the model also does well on the
standard benchmark degradation. Evaluation uses whole held-out photos, never a training one.

Layout follows torchvision's references: data (:class:`PatchDataset`, :func:`degrade`), one
epoch-less step loop (:func:`train_sr`), one evaluation function (:func:`evaluate`).
``catalog train sr`` calls :func:`train_sr`.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from tqdm import tqdm

from worker.steps.superres import CompactSR

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


# --------------------------------------------------------------------------- data


def list_images(source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """A directory (searched recursively) or an explicit list of image files."""
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if root.is_dir():
            return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        return [root]
    return [Path(p) for p in source]


def split_holdout(paths: Sequence[Path], holdout: float | int, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Disjoint (train, eval) photo lists; ``holdout`` is a fraction or a count."""
    paths = sorted(paths)
    rng = random.Random(seed)
    shuffled = paths[:]
    rng.shuffle(shuffled)
    count = int(holdout) if holdout >= 1 else max(1, round(len(paths) * float(holdout)))
    if count >= len(paths):
        raise ValueError(f"{len(paths)} photos cannot leave {count} for evaluation and some for training")
    return sorted(shuffled[count:]), sorted(shuffled[:count])


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def degrade(hr: Image.Image, scale: int, rng: random.Random, clean_prob: float = 0.5) -> Image.Image:
    """HR crop -> LR input: (blur) -> bicubic downscale -> (noise) -> (JPEG)."""
    lr_size = (hr.width // scale, hr.height // scale)
    if rng.random() < clean_prob:
        return hr.resize(lr_size, Image.Resampling.BICUBIC)
    image = hr
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.2)))
    image = image.resize(lr_size, rng.choice([Image.Resampling.BICUBIC, Image.Resampling.BILINEAR,
                                              Image.Resampling.LANCZOS]))
    if rng.random() < 0.5:
        array = np.asarray(image, dtype=np.float32)
        noisy = array + np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(1, 5), array.shape)
        image = Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))
    if rng.random() < 0.6:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=rng.randint(55, 95))
        buffer.seek(0)
        image = Image.open(buffer).convert("RGB")
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class PatchDataset(torch.utils.data.IterableDataset):
    """Endless random (LR, HR) patch pairs from a list of photos held in memory.

    Each photo is also kept at a few smaller sizes so the model sees detail at the scales
    catalog thumbnails have, not only the sensor's native sharpness.
    """

    def __init__(self, paths: Sequence[Path], scale: int, patch: int = 64, seed: int = 0,
                 clean_prob: float = 0.5):
        self.scale = scale
        self.clean_prob = clean_prob
        self.patch = patch  # HR patch side, a multiple of scale
        self.seed = seed
        self.images: list[Image.Image] = []
        for path in paths:
            image = load_rgb(path)
            for factor in (1.0, 0.75, 0.5):
                size = (round(image.width * factor), round(image.height * factor))
                if min(size) >= patch:
                    self.images.append(image if factor == 1.0 else image.resize(size, Image.Resampling.LANCZOS))
        if not self.images:
            raise ValueError(f"no training photo is at least {patch}px on both sides")

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        rng = random.Random(self.seed + (worker.id if worker else 0))
        while True:
            image = rng.choice(self.images)
            x = rng.randrange(0, image.width - self.patch + 1)
            y = rng.randrange(0, image.height - self.patch + 1)
            hr = image.crop((x, y, x + self.patch, y + self.patch))
            if rng.random() < 0.5:
                hr = hr.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if rng.random() < 0.5:
                hr = hr.transpose(Image.Transpose.ROTATE_90)
            yield to_tensor(degrade(hr, self.scale, rng, self.clean_prob)), to_tensor(hr)


# Real photos that ship inside installed packages, split once and for all: the in-house model
# trains (and picks its checkpoint) on TRAIN_PHOTOS only; bench/superres.py reports on
# BENCH_PHOTOS only. "skimage:" = scikit-image's bundled data, "sklearn:" = scikit-learn's
# sample images (optional), paths = Debian's darknet package.
TRAIN_PHOTOS = [
    "skimage:astronaut", "skimage:rocket", "skimage:stereo_motorcycle", "skimage:camera",
    "skimage:coins", "skimage:clock", "skimage:brick", "skimage:gravel",
    "/usr/share/darknet/data/eagle.jpg", "/usr/share/darknet/data/giraffe.jpg",
    "/usr/share/darknet/data/horses.jpg", "/usr/share/darknet/data/person.jpg",
]
BENCH_PHOTOS = [
    "skimage:coffee", "skimage:chelsea", "/usr/share/darknet/data/dog.jpg",
    "/usr/share/darknet/data/kite.jpg", "sklearn:china.jpg", "sklearn:flower.jpg",
]


def _photo_array(spec: str) -> np.ndarray | None:
    if spec.startswith("skimage:"):
        from skimage import data

        array = getattr(data, spec.split(":", 1)[1])()
        array = array[0] if isinstance(array, tuple) else array
    elif spec.startswith("sklearn:"):
        try:
            from sklearn.datasets import load_sample_image
        except ImportError:
            return None
        array = load_sample_image(spec.split(":", 1)[1])
    else:
        if not Path(spec).is_file():
            return None
        array = np.asarray(load_rgb(Path(spec)))
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


def sample_photos(dest: str | os.PathLike[str], specs: Sequence[str]) -> list[Path]:
    """Write the available photos of ``specs`` as lossless PNGs under ``dest``."""
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for spec in specs:
        name = Path(spec.split(":")[-1]).stem
        path = out / f"{name}.png"
        if not path.exists():
            array = _photo_array(spec)
            if array is None:
                log.warning("photo %s is not installed; skipped", spec)
                continue
            Image.fromarray(array).save(path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- metrics


def rgb_to_y(array: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma (16..235) of an RGB uint8/float array, as float64."""
    a = array.astype(np.float64)
    return 16.0 + (65.481 * a[..., 0] + 128.553 * a[..., 1] + 24.966 * a[..., 2]) / 255.0


def psnr_y(pred: np.ndarray, target: np.ndarray, border: int = 0) -> float:
    p, t = rgb_to_y(pred), rgb_to_y(target)
    if border:
        p, t = p[border:-border, border:-border], t[border:-border, border:-border]
    mse = float(np.mean((p - t) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim_y(pred: np.ndarray, target: np.ndarray, border: int = 0) -> float:
    from skimage.metrics import structural_similarity

    p, t = rgb_to_y(pred), rgb_to_y(target)
    if border:
        p, t = p[border:-border, border:-border], t[border:-border, border:-border]
    return float(structural_similarity(p, t, data_range=255.0, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


def hr_lr_pair(path: Path, scale: int, max_side: int = 512) -> tuple[np.ndarray, Image.Image]:
    """Evaluation pair: the photo (cropped to a multiple of scale, at most ``max_side``
    centred) and its bicubic downscale (the standard SR benchmark degradation)."""
    image = load_rgb(path)
    w, h = min(image.width, max_side), min(image.height, max_side)
    w, h = w - w % scale, h - h % scale
    left, top = (image.width - w) // 2, (image.height - h) // 2
    hr = image.crop((left, top, left + w, top + h))
    return np.asarray(hr), hr.resize((w // scale, h // scale), Image.Resampling.BICUBIC)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, paths: Sequence[Path], scale: int,
             device: str | torch.device = "cpu") -> dict[str, float]:
    """Mean Y-channel PSNR/SSIM of ``model`` and of bicubic on held-out photos."""
    model.eval()
    rows = []
    for path in paths:
        hr, lr = hr_lr_pair(path, scale)
        bicubic = np.asarray(lr.resize((hr.shape[1], hr.shape[0]), Image.Resampling.BICUBIC))
        out = model(to_tensor(lr)[None].to(device))[0].float().clamp(0, 1)
        sr = (out.permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
        rows.append((psnr_y(sr, hr, scale), ssim_y(sr, hr, scale),
                     psnr_y(bicubic, hr, scale), ssim_y(bicubic, hr, scale)))
    psnr, ssim, psnr_b, ssim_b = (float(np.mean(col)) for col in zip(*rows, strict=True))
    return {"psnr": psnr, "ssim": ssim, "bicubic_psnr": psnr_b, "bicubic_ssim": ssim_b,
            "gain_db": psnr - psnr_b, "images": len(rows)}


# --------------------------------------------------------------------------- training


def save_checkpoint(model: CompactSR, path: Path, **extra: Any) -> None:
    """fp32 state_dict + architecture + metrics; loadable with ``weights_only=True``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    state = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
    torch.save({"arch": model.arch(), "state_dict": state, **extra}, tmp)
    os.replace(tmp, path)


def train_sr(
    images: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    scale: int = 2,
    steps: int = 3000,
    batch_size: int = 16,
    patch: int = 64,
    lr: float = 2e-3,
    features: int = 32,
    blocks: int = 6,
    holdout: float | int = 0.2,
    eval_images: Iterable[str | os.PathLike[str]] | None = None,
    eval_every: int = 1000,
    seed: int = 0,
    clean_prob: float = 0.5,
    device: str = "cpu",
    threads: int | None = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Train CompactSR at ``scale`` and write ``<out_dir>/inhouse-x<scale>.pt``.

    ``images``: a directory or a list of photos. Unless ``eval_images`` is given, ``holdout``
    (fraction or count) of them is set aside for evaluation and never trained on.
    ``clean_prob`` of the inputs are plain bicubic downscales, the rest get blur/noise/JPEG.
    L1 loss, Adam, cosine learning-rate decay. ``threads=1`` by default: on a shared 2-core
    machine one intra-op thread trained ~10x faster than two (OpenMP threads spin-waiting on
    cores other processes hold). Evaluates every ``eval_every`` steps and at the end,
    keeps the best checkpoint, and writes ``metrics.json`` next to it. Returns the metrics.
    Ctrl-C (KeyboardInterrupt) stops early and still returns: the weights so far are evaluated
    and kept if they beat the best checkpoint (``interrupted_at_step`` says where it stopped).
    """
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    paths = list_images(images)
    if eval_images is not None:
        train_paths, eval_paths = paths, list_images(eval_images)
        overlap = {p.resolve() for p in train_paths} & {p.resolve() for p in eval_paths}
        if overlap:
            raise ValueError(f"evaluation photos also in the training set: {sorted(map(str, overlap))}")
    else:
        train_paths, eval_paths = split_holdout(paths, holdout, seed)
    patch -= patch % scale
    out = Path(out_dir)
    ckpt_path = out / f"inhouse-x{scale}.pt"

    model = CompactSR(scale, features, blocks).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=lr * 0.02)
    dataset = PatchDataset(train_paths, scale, patch, seed, clean_prob)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    batches = iter(loader)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    started = time.perf_counter()
    running = 0.0
    bar = tqdm(range(1, steps + 1), desc=f"train sr x{scale}", disable=not progress, unit="step")
    step, interrupted = 0, None
    try:
        for step in bar:
            model.train()
            lr_batch, hr_batch = (t.to(device) for t in next(batches))
            loss = F.l1_loss(model(lr_batch), hr_batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
            bar.set_postfix(l1=f"{running:.4f}")
            if step % eval_every == 0 or step == steps:
                metrics = evaluate(model, eval_paths, scale, device)
                metrics.update(step=step, train_l1=running, seconds=round(time.perf_counter() - started, 1))
                history.append(metrics)
                log.info("step %d: %.2f dB (bicubic %.2f)", step, metrics["psnr"], metrics["bicubic_psnr"])
                bar.write(f"step {step}: PSNR-Y {metrics['psnr']:.2f} dB (bicubic {metrics['bicubic_psnr']:.2f}),"
                          f" SSIM-Y {metrics['ssim']:.4f} (bicubic {metrics['bicubic_ssim']:.4f})")
                if best is None or metrics["psnr"] > best["psnr"]:
                    best = metrics
                    save_checkpoint(model, ckpt_path, metrics=metrics, step=step,
                                    train_images=[p.name for p in train_paths],
                                    eval_images=[p.name for p in eval_paths])
    except KeyboardInterrupt:
        # Ctrl-C: keep the best weights so far. The weights of the interrupted run are evaluated
        # once more and saved only if they beat the best checkpoint (they may be mid-update).
        bar.close()
        interrupted = step
        log.warning("train sr interrupted at step %d; evaluating the weights so far", step)
        if step > (best["step"] if best else 0):
            metrics = evaluate(model, eval_paths, scale, device)
            metrics.update(step=step, train_l1=running, seconds=round(time.perf_counter() - started, 1),
                           interrupted=True)
            history.append(metrics)
            if best is None or metrics["psnr"] > best["psnr"]:
                best = metrics
                save_checkpoint(model, ckpt_path, metrics=metrics, step=step,
                                train_images=[p.name for p in train_paths],
                                eval_images=[p.name for p in eval_paths])
        if best is None:
            raise  # not one step done: nothing worth saving
    assert best is not None
    result = {
        "checkpoint": str(ckpt_path), "scale": scale, "best": best, "history": history,
        "train_images": [str(p) for p in train_paths], "eval_images": [str(p) for p in eval_paths],
        "config": {"steps": steps, "batch_size": batch_size, "patch": patch, "lr": lr,
                   "features": features, "blocks": blocks, "seed": seed, "clean_prob": clean_prob},
        "interrupted_at_step": interrupted,  # None: ran all steps
    }
    (out / f"inhouse-x{scale}.metrics.json").write_text(json.dumps(result, indent=2))
    return result
