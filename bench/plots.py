"""PNG plots of a bench run, drawn with Pillow (matplotlib is not a dependency): throughput
against worker processes, and the latency percentiles."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

W, H, PAD = 360, 260, 50
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def _panel(draw: ImageDraw.ImageDraw, left: int, top: int, title: str, xs: Sequence[int],
           series: Sequence[tuple[str, Sequence[float | None]]], ylabel: str) -> None:
    font = ImageFont.load_default()
    draw.text((left, top - 34), title, fill="black", font=font)
    draw.rectangle((left, top, left + W, top + H), outline="black")
    values = [v for _, ys in series for v in ys if v is not None]
    top_value = max(values) * 1.15 if values else 1.0
    for i in range(5):  # y grid
        y = top + H - H * i / 4
        draw.line((left, y, left + W, y), fill="#dddddd")
        draw.text((left - 44, y - 6), f"{top_value * i / 4:.3g}", fill="gray", font=font)
    draw.text((left - 44, top - 16), ylabel, fill="gray", font=font)
    span = max(1, len(xs) - 1)
    px = [left + 30 + (W - 60) * i / span for i in range(len(xs))]
    for x, value in zip(px, xs, strict=True):
        draw.text((x - 4, top + H + 6), str(value), fill="black", font=font)
    draw.text((left + W // 2 - 40, top + H + 20), "worker processes", fill="gray", font=font)
    for k, (name, ys) in enumerate(series):
        colour = COLOURS[k % len(COLOURS)]
        points = [(x, top + H - H * y / top_value) for x, y in zip(px, ys, strict=True) if y is not None]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)
        draw.text((left + 8, top + 6 + 14 * k), name, fill=colour, font=font)


def throughput_png(path: Path, e2e: dict[str, Any], subtitle: str) -> Path:
    """Images/s against worker processes: metadata-only, and all steps with the model-only
    ceiling measured in the same run."""
    runs = e2e["details"]["runs"]
    procs = sorted({int(v["processes"]) for v in runs.values()})
    ceilings = e2e["details"].get("model_only", {})
    img = Image.new("RGB", (2 * (W + PAD) + PAD + 20, H + 130), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 6), f"End-to-end throughput (Redis stream -> ingest -> Celery -> Postgres). {subtitle}",
              fill="black", font=ImageFont.load_default())
    meta = [runs.get(f"metadata-{p}", {}).get("images_per_s") for p in procs]
    allsteps = [runs.get(f"all-{p}", {}).get("images_per_s") for p in procs]
    ceiling = [ceilings.get(str(p)) for p in procs]
    _panel(draw, PAD, 70, "metadata step only", procs, [("end to end", meta)], "img/s")
    _panel(draw, 2 * PAD + W + 20, 70, "all steps", procs,
           [("end to end", allsteps), ("model-only ceiling", ceiling)], "img/s")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "PNG")
    return path


def latency_png(path: Path, latency: dict[str, Any], subtitle: str) -> Path:
    """p50 / p95 / p99 bars of XADD -> listing done."""
    p = latency["details"]["percentiles_ms"]
    img = Image.new("RGB", (W + 2 * PAD + 40, H + 120), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    offered = latency["details"].get("offered_per_s")
    draw.text((10, 6), "Latency XADD -> listing rows committed (metadata step)", fill="black", font=font)
    draw.text((10, 20), f"{offered} listings/s offered, 1 worker process. {subtitle}", fill="gray", font=font)
    left, top = PAD + 10, 60
    draw.rectangle((left, top, left + W, top + H), outline="black")
    keys = sorted(p, key=lambda k: int(k))
    top_value = max(p.values()) * 1.15 or 1.0
    for i in range(5):
        y = top + H - H * i / 4
        draw.line((left, y, left + W, y), fill="#dddddd")
        draw.text((left - 44, y - 6), f"{top_value * i / 4:.3g}", fill="gray", font=font)
    draw.text((left - 44, top - 16), "ms", fill="gray", font=font)
    width = W / (len(keys) * 2)
    for i, key in enumerate(keys):
        x0 = left + width * (2 * i + 0.5)
        y = top + H - H * p[key] / top_value
        draw.rectangle((x0, y, x0 + width, top + H), fill=COLOURS[i % len(COLOURS)])
        draw.text((x0, top + H + 6), f"p{key}", fill="black", font=font)
        draw.text((x0, y - 14), f"{p[key]:.0f} ms", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "PNG")
    return path
