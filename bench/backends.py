"""ONNX graphs on both engines, side by side: onnxruntime vs the graph converted to torch.

    python -m bench.backends                       # ~2-4 min on 2 cores
    python -m bench.backends --threads 1,2 --repeat 3 --json out.json
    python -m bench.backends --device cuda --threads 16      # on a GPU machine

For each thread count (the per-process budget ``catalog worker`` gives each child: cores /
processes) and each model that ships as ONNX (U²-Netp segmentation, open_nsfw, PP-OCRv4
det+cls+rec through rapidocr), the same photos run through ``onnx2torch`` (how segmentation
ran before issue 14; the CUDA default) and through onnxruntime (the CPU default since), in
one process, one after the other. Printed and written as JSON: ms per image (median over
``--repeat`` passes of every photo), the speed-up, and how far the outputs are apart: mask
IoU (foreground >= 0.5) and max abs difference of the probabilities, NSFW score difference,
OCR lines read identically or not.

Every figure carries the load average it was measured under: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

PHOTOS = ("coffee", "astronaut", "chelsea", "rocket")
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")


def photos() -> list[Image.Image]:
    from skimage import data

    return [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]


def text_photo() -> Image.Image:
    """The coffee photo with a phone number and an e-mail address drawn on it."""
    from PIL import ImageDraw, ImageFont
    from skimage import data

    img = Image.fromarray(data.coffee()).convert("RGB")
    draw = ImageDraw.Draw(img)
    font = ImageFont.truetype(str(FONT), 30) if FONT.exists() else ImageFont.load_default()
    for xy, text in (((20, 20), "Call +44 7911 123456"), ((20, 330), "deals.shop@gmail.com")):
        draw.text(xy, text, font=font, fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
    return img


def _timed(fn: Callable[[Image.Image], Any], images: Sequence[Image.Image], repeat: int) -> tuple[float, list[Any]]:
    """Median ms per image over ``repeat`` passes (after one warm-up pass), and the outputs."""
    outputs = [fn(image) for image in images]  # warm-up, and the outputs compared
    passes = []
    for _ in range(repeat):
        started = time.perf_counter()
        for image in images:
            fn(image)
        passes.append((time.perf_counter() - started) * 1000 / len(images))
    return statistics.median(passes), outputs


def _pair(cls: Any, threads: int, device: str = "cpu") -> tuple[Any, Any]:
    common = {"device": device, "torch_threads": threads, "batch_max_size": 1}
    return cls(onnx_engine="torch", **common), cls(onnx_engine="onnxruntime", **common)


def _compare_masks(a: list[Any], b: list[Any]) -> dict[str, float]:
    ious, diffs = [], []
    for ma, mb in zip(a, b, strict=True):
        fa, fb = ma.prob >= 0.5, mb.prob >= 0.5
        ious.append(float((fa & fb).sum() / max(1, (fa | fb).sum())))
        diffs.append(float(np.abs(ma.prob - mb.prob).max()))
    return {"min_mask_iou": round(min(ious), 5), "max_abs_diff": float(f"{max(diffs):.3g}")}


def _compare_scores(a: list[float], b: list[float]) -> dict[str, float]:
    return {"max_abs_diff": float(f"{max(abs(x - y) for x, y in zip(a, b, strict=True)):.3g}")}


def _compare_text(a: list[Any], b: list[Any]) -> dict[str, Any]:
    ta = [[line.text for line in lines] for lines in a]
    tb = [[line.text for line in lines] for lines in b]
    return {"same_text": ta == tb, "text": ta[0]}


def _batch_ms(model: Any, images: Sequence[Image.Image], repeat: int) -> float:
    """ms per image when ``images`` go through one forward (onnxruntime accepts the batch)."""
    model.predict_batch(images)
    passes = []
    for _ in range(repeat):
        started = time.perf_counter()
        model.predict_batch(images)
        passes.append((time.perf_counter() - started) * 1000 / len(images))
    return statistics.median(passes)


def measure(threads: Sequence[int] = (1, 2), repeat: int = 3, models: Sequence[str] = ("segmentation", "nsfw", "ocr"),
            log: Callable[[str], None] = print, device: str = "cpu") -> dict[str, Any]:
    """Run the side-by-side; returns what is printed, as a dict (``rows`` and the context)."""
    import torch

    from worker.fraud.contact import PpOcr
    from worker.fraud.nsfw import OpenNsfw
    from worker.steps.segmentation import U2Netp

    images, ocr_images = photos(), [text_photo()]
    rows: list[dict[str, Any]] = []
    cases: dict[str, tuple[Any, list[Image.Image], Callable[[list[Any], list[Any]], dict[str, Any]]]] = {
        "segmentation": (U2Netp, images, _compare_masks),
        "nsfw": (OpenNsfw, images, _compare_scores),
        "ocr": (PpOcr, ocr_images, _compare_text),
    }
    for count in threads:
        torch.set_num_threads(count)
        for name in models:
            cls, inputs, compare = cases[name]
            on_torch, on_ort = _pair(cls, count, device)
            load = os.getloadavg()[0]
            torch_ms, torch_out = _timed(on_torch.predict, inputs, repeat)
            ort_ms, ort_out = _timed(on_ort.predict, inputs, repeat)
            row: dict[str, Any] = {
                "model": f"{name} ({cls.name})", "threads": count, "photos": len(inputs),
                "torch_on": on_torch.load().describe(), "onnxruntime_on": on_ort.load().describe(),
                "torch_ms": round(torch_ms, 1), "onnxruntime_ms": round(ort_ms, 1),
                "speedup": round(torch_ms / ort_ms, 2), **compare(torch_out, ort_out),
                "load_1min": round(load, 2),
            }
            if name == "segmentation":  # the batch fix: four photos, one onnxruntime forward
                row["onnxruntime_batch4_ms"] = round(_batch_ms(on_ort, inputs, repeat), 1)
            rows.append(row)
            log(_line(row))
    return {
        "what": "ONNX graphs: onnx2torch vs onnxruntime, same photos and threads, one process",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(), "device": device, "repeat": repeat, "rows": rows,
    }


def _line(row: dict[str, Any]) -> str:
    extra = {k: v for k, v in row.items()
             if k not in ("model", "threads", "photos", "torch_ms", "onnxruntime_ms", "speedup", "load_1min", "text",
                          "torch_on", "onnxruntime_on")}
    return (f"{row['model']:<26} threads={row['threads']}  torch {row['torch_ms']:>7.1f} ms  "
            f"onnxruntime {row['onnxruntime_ms']:>7.1f} ms  x{row['speedup']:<5}  "
            + "  ".join(f"{k}={v}" for k, v in extra.items()) + f"  (load {row['load_1min']})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="intra-op thread counts, comma-separated (default 1,2)")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes over the photos (median; default 3)")
    parser.add_argument("--models", default="segmentation,nsfw,ocr", help="subset of segmentation,nsfw,ocr")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the models run (cuda: torch twins on the GPU vs onnxruntime's provider)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    result = measure(tuple(int(t) for t in args.threads.split(",")), args.repeat,
                     tuple(m.strip() for m in args.models.split(",") if m.strip()), device=args.device)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
