"""Analysing one photo outside any listing (POST /analyze, search by photo): the pipeline's own
steps and limits, nothing stored."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from worker.config import Settings
from worker.io.errors import ImageLoadError
from worker.search.analyze import AnalyzeError, analyze_photo, analyze_steps, decode_upload

STEPS = ["metadata", "tagging", "detection", "segmentation", "embedding", "quality"]


def coffee_bytes() -> bytes:
    from skimage import data

    out = io.BytesIO()
    Image.fromarray(data.coffee()).save(out, format="JPEG", quality=90)
    return out.getvalue()


@pytest.fixture(scope="module")
def coffee() -> bytes:
    return coffee_bytes()


def test_a_cup_photo_gets_category_tags_colours_boxes_and_vectors_and_nothing_is_stored(
        coffee: bytes, make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    settings = make_settings(steps=STEPS, torch_threads=1)
    assert analyze_steps(settings) == ["tagging", "detection", "segmentation", "embedding"]
    analysis = analyze_photo(decode_upload(coffee, settings), settings)
    result = analysis.to_dict()
    assert (result["width"], result["height"], result["format"]) == (600, 400, "JPEG")
    assert result["category"]["name"] == "kitchenware" and result["category"]["names"] == {"zh-CN": "厨具"}
    assert {t["source"] for t in result["tags"]} >= {"imagenet", "category-map", "detection", "colour"}
    cup = next(b for b in result["boxes"] if b["label"] == "cup")
    x0, y0, x1, y1 = cup["box"]
    assert 0 <= x0 < x1 <= 600 and 0 <= y0 < y1 <= 400 and cup["names"] == {"zh-CN": "杯子"}
    assert result["colours"] and all(c["names"] for c in result["colours"])
    assert result["product_box"] is not None
    assert [s["step"] for s in result["steps"]] == ["tagging", "detection", "segmentation", "embedding"]
    assert {s["status"] for s in result["steps"]} == {"ok"}
    for kind in ("full", "region"):
        vector, version = analysis.vector(kind)
        assert vector.shape == (1280,) and abs(float(np.linalg.norm(vector)) - 1) < 1e-4
        assert version.startswith("efficientnet-lite0")
    # The region vector is the product crop's, not the whole photo's.
    assert float(analysis.vector("region")[0] @ analysis.vector("full")[0]) < 0.9999
    # Nothing written: no database, no artifact (the cutout went to a removed scratch dir).
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*"))


def test_only_the_configured_describing_steps_run(coffee: bytes, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(steps=["metadata", "quality"])
    analysis = analyze_photo(decode_upload(coffee, settings), settings)
    assert analysis.steps == [] and analysis.category is None and analysis.tags == []
    with pytest.raises(AnalyzeError, match="no search vector could be computed for this photo: no analysis step"):
        analysis.vector("region")


@pytest.mark.parametrize(("make", "code", "words"), [
    (lambda: b"%PDF-1.7 not a photo", "unsupported_format", "PDF"),
    (lambda: b"hello, this is text", "not_an_image", "not an image"),
    (lambda: b"", "not_an_image", "empty"),
    (lambda: coffee_bytes()[:5000], "truncated", "truncated"),
])
def test_uploads_that_are_no_usable_image_are_refused_in_one_sentence(
        make: Callable[[], bytes], code: str, words: str, make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ImageLoadError) as caught:
        decode_upload(make(), make_settings(), "the photo")
    assert caught.value.code == code and words in str(caught.value)
    assert str(caught.value).startswith("the photo") and "\n" not in str(caught.value)


def test_the_listing_photo_limits_apply(coffee: bytes, make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ImageLoadError, match="CATALOG_FETCH_MAX_BYTES") as big:
        decode_upload(coffee, make_settings(fetch_max_bytes=10_000))
    assert big.value.code == "too_large"
    with pytest.raises(ImageLoadError, match="CATALOG_MAX_PIXELS") as wide:
        decode_upload(coffee, make_settings(max_pixels=100_000))
    assert wide.value.code == "too_many_pixels"


CRASH_ORDER = """
import io, sys
from skimage import data
from PIL import Image
import worker.search.analyze as analyze    # what `catalog api` loads with the search routes
import usearch.index                       # a visual-search query loads the embedded index
from worker.config import load_settings
settings = load_settings(data_dir=sys.argv[1], steps=["segmentation"], torch_threads=1, onnx_backend="onnxruntime")
out = io.BytesIO()
Image.fromarray(data.coffee()).save(out, format="JPEG")
result = analyze.analyze_photo(analyze.decode_upload(out.getvalue(), settings), settings)
print([s["status"] for s in result.steps])
"""


def test_a_query_before_an_analysis_does_not_crash_the_process(tmp_path: Path) -> None:
    """usearch loaded before onnxruntime made the first U2-Netp run segfault (the API serves
    similar queries and /analyze in one process); worker.search.analyze loads onnxruntime first."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", CRASH_ORDER, str(tmp_path / "data")], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[3])
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip().endswith("['ok']")
