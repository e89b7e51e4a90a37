"""Super-resolution bench: quality against bicubic and speed, on held-out real photos.

    python -m bench.superres                      # CPU, 1 intra-op thread, crops <= 256 px
    python -m bench.superres --threads 2 --max-side 384
    python -m bench.superres --device cuda        # GPU, whole photos up to 1024 px (< 5 min)

Photos: ``worker.sr_train.BENCH_PHOTOS`` (scikit-image coffee and chelsea, darknet dog and
kite, scikit-learn china and flower when scikit-learn is installed). None of them is in
``TRAIN_PHOTOS``, which is all the in-house model ever saw. Each photo (centre crop of at
most ``--max-side`` px, a multiple of 4) is downscaled with bicubic (the standard SR
degradation) and enlarged back by bicubic and by each model; PSNR and SSIM are computed on
the luma (Y, BT.601) channel with ``scale`` border pixels ignored. Models run through the
production tiling (worker.tiling) with their default overlap; speed is milliseconds per
output megapixel over all photos (warm: one untimed run first).

Writes ``bench/out/superres.json`` and the side-by-side picture
``docs/img/sr_side_by_side.png``; prints Markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from worker.models import ncnn
from worker.models.tiling import upscale_tiled
from worker.steps.superres import DEFAULT_OVERLAP, build_module, find_model
from worker.training.sr import BENCH_PHOTOS, TRAIN_PHOTOS, psnr_y, sample_photos, ssim_y

ROOT = Path(__file__).resolve().parent.parent


def load_models(model_dir: Path, device: torch.device) -> dict[str, tuple[int, torch.nn.Module, str]]:
    """name -> (scale, module, weights file) for every SR model installed."""
    models = {}
    if find_model("waifu2x-photo", None, model_dir) is None or find_model("realesrgan-x4plus", None, model_dir) is None:
        print(f"importing the ncnn models into {model_dir} ...")
        for name, row in ncnn.import_ncnn_models(model_dir).items():
            print(f"  {name}: {row['status']} ({row.get('psnr_db')} dB vs ncnn) {row.get('error', '')}")
    for name, scale in (("waifu2x-photo", 2), ("realesrgan-x4plus", 4), ("inhouse", 2), ("inhouse", 4)):
        files = find_model(name, scale, model_dir)
        if files is None:
            print(f"  {name} x{scale}: not installed, skipped")
            continue
        models[files.name] = (files.scale, build_module(files).to(device).eval(), str(files.weights))
    return models


def make_runner(module: torch.nn.Module, scale: int, name: str, device: torch.device,
                passes: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    overlap = DEFAULT_OVERLAP.get(name, 8)
    autocast = (torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))

    def run(lr: np.ndarray) -> np.ndarray:
        out = lr
        for _ in range(passes):
            x = torch.from_numpy(out.astype(np.float32) / 255.0).permute(2, 0, 1).to(device)
            with torch.inference_mode(), autocast:
                out = upscale_tiled(x, module, scale, tile=192, overlap=overlap, max_batch=4)
        return out

    return run


def hr_crop(path: Path, max_side: int) -> np.ndarray:
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    w, h = min(image.width, max_side), min(image.height, max_side)
    w, h = w - w % 4, h - h % 4
    left, top = (image.width - w) // 2, (image.height - h) // 2
    return np.asarray(image.crop((left, top, left + w, top + h)))


def bicubic(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize(size, Image.Resampling.BICUBIC))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def side_by_side(rows: list[tuple[str, list[tuple[str, np.ndarray]]]], path: Path, cell: int = 176) -> None:
    """One row per scale: labelled crops (LR nearest-enlarged, bicubic, models, original)."""
    columns = max(len(items) for _, items in rows)
    label_h = 16
    canvas = Image.new("RGB", (columns * (cell + 4) + 4, len(rows) * (cell + label_h + 6) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (title, items) in enumerate(rows):
        y = 4 + r * (cell + label_h + 6)
        for c, (label, array) in enumerate(items):
            x = 4 + c * (cell + 4)
            tile = Image.fromarray(array).resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(tile, (x, y + label_h))
            draw.text((x + 2, y + 2), f"{title} {label}" if c == 0 else label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--max-side", type=int, default=None, help="HR crop side (default 256 CPU, 1024 CUDA)")
    parser.add_argument("--model-dir", type=Path, default=ROOT / ".catalog" / "models")
    parser.add_argument("--picture", type=Path, default=ROOT / "docs" / "img" / "sr_side_by_side.png")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "superres.json")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    max_side = args.max_side or (1024 if device.type == "cuda" else 256)
    assert not set(BENCH_PHOTOS) & set(TRAIN_PHOTOS)
    photos = sample_photos(Path(tempfile.gettempdir()) / "catalog-sr-bench-photos", BENCH_PHOTOS)
    models = load_models(args.model_dir, device)

    methods: dict[int, dict[str, Callable[[np.ndarray], np.ndarray]]] = {2: {}, 4: {}}
    for name, (scale, module, _) in models.items():
        methods[scale][name] = make_runner(module, scale, name, device)
        if scale == 2 and name == "waifu2x-photo":  # what `auto` falls back to without Real-ESRGAN
            methods[4]["waifu2x-photo x2 twice"] = make_runner(module, 2, name, device, passes=2)

    results: dict[str, dict] = {}
    pictures: list[tuple[str, list[tuple[str, np.ndarray]]]] = []
    for scale in (2, 4):
        per_image: dict[str, list[dict]] = {"bicubic": [], **{m: [] for m in methods[scale]}}
        timings: dict[str, list[float]] = {m: [] for m in methods[scale]}
        for run in methods[scale].values():  # warm-up (allocator, cuDNN autotune)
            run(np.zeros((32, 32, 3), np.uint8))
        for index, path in enumerate(photos):
            hr = hr_crop(path, max_side)
            h, w = hr.shape[:2]
            lr = bicubic(hr, (w // scale, h // scale))
            outputs = {"bicubic": bicubic(lr, (w, h))}
            for m, run in methods[scale].items():
                sync(device)
                started = time.perf_counter()
                outputs[m] = run(lr)
                sync(device)
                timings[m].append((time.perf_counter() - started) * 1000 / (h * w / 1e6))
            for m, out in outputs.items():
                per_image[m].append({"image": path.stem, "psnr": psnr_y(out, hr, scale),
                                     "ssim": ssim_y(out, hr, scale)})
            if index == 0:  # side-by-side crops from the first photo (coffee)
                cy, cx = h // 2 - 48, w // 2 - 48

                def crop(a: np.ndarray, cy: int = cy, cx: int = cx) -> np.ndarray:
                    return a[cy : cy + 96, cx : cx + 96]

                lr_crop = lr[cy // scale : (cy + 96) // scale, cx // scale : (cx + 96) // scale]
                items = [("LR", np.asarray(Image.fromarray(lr_crop).resize((96, 96), Image.Resampling.NEAREST)))]
                items += [(m, crop(o)) for m, o in outputs.items()] + [("original", crop(hr))]
                pictures.append((f"x{scale}", items))
        summary: dict[str, dict[str, Any]] = {}
        for m, rows in per_image.items():
            summary[m] = {
                "psnr_mean": statistics.fmean(r["psnr"] for r in rows),
                "ssim_mean": statistics.fmean(r["ssim"] for r in rows),
                "ms_per_output_mp": statistics.fmean(timings[m]) if m in timings else None,
                "per_image": rows,
            }
        base = summary["bicubic"]["psnr_mean"]
        for m in summary:
            summary[m]["gain_db"] = summary[m]["psnr_mean"] - base
        results[f"x{scale}"] = summary

    side_by_side(pictures, args.picture)
    report = {
        "device": args.device, "threads": args.threads, "max_side": max_side,
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "photos": [p.stem for p in photos], "weights": {n: w for n, (_, _, w) in models.items()},
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print_tables(report)
    print(f"\nwrote {args.json} and {args.picture} ({args.picture.stat().st_size // 1024} KiB)")
    return report


def print_tables(report: dict) -> None:
    photos = report["photos"]
    print(f"\n{len(photos)} held-out photos ({', '.join(photos)}), crops <= {report['max_side']} px, "
          f"device {report['device']}, {report['threads']} thread(s)")
    for key, summary in report["results"].items():
        print(f"\n{key}: PSNR-Y dB / SSIM-Y per photo, mean, gain over bicubic, ms per output MP")
        print("| method | " + " | ".join(photos) + " | mean PSNR | mean SSIM | vs bicubic | ms/MP |")
        print("|---|" + "---|" * (len(photos) + 4))
        for m, row in summary.items():
            cells = [f"{r['psnr']:.2f} / {r['ssim']:.3f}" for r in row["per_image"]]
            speed = "–" if row["ms_per_output_mp"] is None else f"{row['ms_per_output_mp']:,.0f}"
            print(f"| {m} | " + " | ".join(cells) +
                  f" | {row['psnr_mean']:.2f} | {row['ssim_mean']:.4f} | {row['gain_db']:+.2f} dB | {speed} |")


if __name__ == "__main__":
    main()
