"""`catalog demo`: real photos that ship inside installed packages, through the pipeline."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from worker.config import Settings


def demo_photos(out: Path) -> list[Path]:
    """Write the sample photos of scikit-image (shipped in its wheel, no download) to ``out``."""
    from skimage import data

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ("coffee", "chelsea", "astronaut", "rocket"):
        path = out / f"{name}.jpg"
        if not path.exists():
            Image.fromarray(getattr(data, name)()).convert("RGB").save(path, quality=92)
        written.append(path)
    # A small copy: shows super-resolution where that step is enabled.
    small = out / "coffee-small.jpg"
    if not small.exists():
        Image.open(out / "coffee.jpg").resize((200, 133), Image.Resampling.LANCZOS).save(small, quality=90)
    written.append(small)
    return written


def run_demo(settings: Settings, out: Path, as_json: bool, echo: Callable[[str], None]) -> None:
    from worker.cli import run_in_process
    from worker.report import listing_report, render_report

    photos = demo_photos(out)
    echo(f"demo: {len(photos)} photos from scikit-image written to {out.resolve()}")
    echo(f"demo: steps {', '.join(settings.steps)}; database {settings.effective_database_url}\n")
    external_id = run_in_process(settings, [str(p.resolve()) for p in photos], seller="demo-seller",
                                 category="kitchenware", listing_id="demo-listing",
                                 title="Espresso cup, cat and friends")
    report = listing_report(settings, external_id)
    echo(json.dumps(report, indent=2, default=str) if as_json else render_report(report))
