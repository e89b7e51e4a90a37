"""PNG artifacts of a retrain: a confusion matrix (category head) and a reliability diagram
(fraud scorer), drawn with Pillow (matplotlib is not a dependency)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

CELL = 36
MARGIN = 150


def confusion_png(path: Path, classes: Sequence[str], matrix: Sequence[Sequence[int]], title: str) -> Path:
    """Rows: true class, columns: predicted; a cell's shade is its share of the row."""
    n = len(classes)
    size = MARGIN + n * CELL + 20
    img = Image.new("RGB", (size, size + 30), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((10, 8), title, fill="black", font=font)
    draw.text((MARGIN, 28), "predicted ->", fill="gray", font=font)
    top = MARGIN + 30
    for i, name in enumerate(classes):
        draw.text((6, top + i * CELL + CELL // 3), name[:22], fill="black", font=font)
        # column names, vertically: one character per line would be unreadable; abbreviate
        draw.text((MARGIN + i * CELL + 2, top - 16 - (i % 3) * 12), name[:6], fill="black", font=font)
    for i, row in enumerate(matrix):
        total = max(1, sum(row))
        for j, count in enumerate(row):
            share = count / total
            shade = int(255 - 200 * share)
            colour = (shade, shade, 255) if i == j else (255, shade, shade)
            box = (MARGIN + j * CELL, top + i * CELL, MARGIN + (j + 1) * CELL - 1, top + (i + 1) * CELL - 1)
            draw.rectangle(box, fill=colour, outline="lightgray")
            if count:
                draw.text((box[0] + 8, box[1] + CELL // 3), str(count), fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "PNG")
    return path


def reliability_png(path: Path, bins: Sequence[dict[str, float]], title: str) -> Path:
    """Predicted probability (x) against the observed confirmed share (y) per bin, with the
    diagonal of perfect calibration; bins are dicts with ``mean_p``, ``observed``, ``count``."""
    w = h = 320
    pad = 40
    img = Image.new("RGB", (w + 2 * pad, h + 2 * pad), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 10), title, fill="black", font=ImageFont.load_default())
    draw.rectangle((pad, pad, pad + w, pad + h), outline="black")
    draw.line((pad, pad + h, pad + w, pad), fill="gray")
    for b in bins:
        if not b["count"]:
            continue
        x = pad + b["mean_p"] * w
        y = pad + h - b["observed"] * h
        r = 3 + min(8, int(b["count"]) // 5)
        draw.ellipse((x - r, y - r, x + r, y + r), fill="blue")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "PNG")
    return path
