"""Colours and the background score measured on an evenly spaced sample of at most
``SAMPLE_POINTS`` pixels (issue 14's overhead cuts) against every pixel, on real photos:
the same colour names above the tag threshold, shares within 0.05, the same background
colour and a plainness score within 0.03."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from PIL import Image

from worker.steps.colours import SAMPLE_POINTS, background_plainness, dominant_colours

PHOTOS = ("coffee", "astronaut", "chelsea", "rocket")
MIN_SHARE = 0.08  # CATALOG_COLOUR_MIN_SHARE's default: colours below it are not tags
CLUSTERS = 4  # CATALOG_COLOUR_CLUSTERS' default


def _split(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The photo (longer side 512, to keep the every-pixel reference quick) split by a
    central ellipse into 'product' and 'background' pixels."""
    img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    img = img.resize((512, round(512 * img.height / img.width)), Image.Resampling.BICUBIC)
    px = np.asarray(img)
    h, w = px.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    inside = ((xx - w / 2) / (w / 3)) ** 2 + ((yy - h / 2) / (h / 3)) ** 2 < 1
    return px[inside], px[~inside]


@pytest.mark.slow  # k-means over every pixel as the reference: ~10 s per photo on a loaded machine
@pytest.mark.parametrize("name", PHOTOS)
def test_sampled_colours_name_what_every_pixel_names(name: str) -> None:
    fg, bg = _split(name)
    assert len(fg) > 5 * SAMPLE_POINTS  # the sample really is a sample
    every = {c["name"]: c["share"] for c in dominant_colours(fg, CLUSTERS, max_points=len(fg))}
    sampled = {c["name"]: c["share"] for c in dominant_colours(fg, CLUSTERS)}
    assert {n for n, s in every.items() if s >= MIN_SHARE} == {n for n, s in sampled.items() if s >= MIN_SHARE}
    for colour, share in every.items():
        if share >= MIN_SHARE:
            assert abs(sampled[colour] - share) <= 0.05, (colour, share, sampled[colour])
    full = background_plainness(bg, max_points=len(bg))
    fast = background_plainness(bg)
    assert fast["colour"] == full["colour"]
    assert abs(fast["score"] - full["score"]) <= 0.03
    assert dominant_colours(fg, CLUSTERS) == dominant_colours(fg, CLUSTERS)  # deterministic
