"""The models that ship as ONNX graphs give the same results on both engines.

``CATALOG_ONNX_BACKEND`` picks onnxruntime (the CPU default) or the graph converted to torch
(the CUDA default); the steps never know which. These tests run the real graphs on real
photos (scikit-image's) through both engines and compare: U²-Netp masks (IoU >= 0.99 and
probabilities within 1e-3), open_nsfw scores (within 1e-3), PP-OCR text (the same lines).
Correctness only: no timings here (``python -m bench.backends`` measures them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image, ImageDraw, ImageFont

from worker.config import ConfigError, load_settings
from worker.models.backends import OnnxBackend, TorchBackend, onnx_engine
from worker.models.runtime import model_kwargs

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx2torch")

# Real graphs on both engines: tens of seconds on two CPU cores.
pytestmark = pytest.mark.slow

FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
PHOTOS = ("coffee", "astronaut", "chelsea", "rocket")


def _photos() -> list[Image.Image]:
    return [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]


def _pair(cls: type, **kwargs: object) -> tuple:
    """The same model on torch and on onnxruntime (CPU, 2 threads, batching allowed)."""
    common = {"device": "cpu", "torch_threads": 2, "batch_max_size": 4, **kwargs}
    return cls(onnx_engine="torch", **common), cls(onnx_engine="onnxruntime", **common)


def test_auto_is_onnxruntime_on_cpu_and_torch_on_cuda() -> None:
    assert onnx_engine("auto", torch.device("cpu")) == "onnxruntime"
    assert onnx_engine("auto", torch.device("cuda")) == "torch"
    assert onnx_engine("torch", torch.device("cpu")) == "torch"
    assert onnx_engine("onnxruntime", torch.device("cuda")) == "onnxruntime"


def test_setting_reaches_every_model_and_forces_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.steps.segmentation import U2Netp

    monkeypatch.setenv("CATALOG_ONNX_BACKEND", "torch")
    forced = U2Netp(**model_kwargs(load_settings(device="cpu")))
    assert forced.onnx_engine == "torch" and isinstance(forced.load(), TorchBackend)
    monkeypatch.setenv("CATALOG_ONNX_BACKEND", "auto")
    default = U2Netp(**model_kwargs(load_settings(device="cpu")))
    assert default.onnx_engine == "onnxruntime" and isinstance(default.load(), OnnxBackend)
    assert forced.version == default.version  # the weights file's digest, whatever the engine


def test_unknown_or_uninstalled_engine_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="CATALOG_ONNX_BACKEND"):
        load_settings(onnx_backend="tensorrt")
    import worker.config

    monkeypatch.setattr(worker.config, "_installed", lambda module: module != "onnx2torch")
    with pytest.raises(ConfigError, match=r"CATALOG_ONNX_BACKEND: torch is forced but the 'onnx2torch'"):
        load_settings(onnx_backend="torch")
    assert load_settings(onnx_backend="onnxruntime").onnx_backend == "onnxruntime"


def test_u2netp_masks_agree_between_engines() -> None:
    from worker.steps.segmentation import U2Netp

    on_torch, on_ort = _pair(U2Netp)
    for photo in _photos():
        a, b = on_torch.predict(photo), on_ort.predict(photo)
        fa, fb = a.prob >= 0.5, b.prob >= 0.5
        iou = (fa & fb).sum() / max(1, (fa | fb).sum())
        assert iou >= 0.99
        assert float(np.abs(a.prob - b.prob).max()) < 1e-3


def test_u2netp_takes_batches_on_onnxruntime() -> None:
    """The graph declares batch 1; onnxruntime runs 4 photos in one forward once it is
    declared symbolic, and each mask equals the one-photo forward's."""
    from worker.steps.segmentation import U2Netp

    _, on_ort = _pair(U2Netp)
    backend = on_ort.load()
    assert isinstance(backend, OnnxBackend) and backend.max_batch is None and on_ort.batching()
    photos = _photos()[:3]
    items = [on_ort.prepare(photo) for photo in photos]
    batched = backend.forward(torch.stack([item.tensor for item in items]))
    assert batched.shape == (3, 1, 320, 320)
    for i, item in enumerate(items):
        alone = backend.forward(item.tensor[None])
        assert float((alone[0] - batched[i]).abs().max()) < 1e-5
    futures = [on_ort.submit(photo) for photo in photos]  # through the dynamic batcher
    assert all(f.result(timeout=60).prob.shape == (320, 320) for f in futures)
    on_ort.close()


def test_nsfw_scores_agree_between_engines() -> None:
    from worker.fraud.nsfw import OpenNsfw

    on_torch, on_ort = _pair(OpenNsfw)
    assert isinstance(on_torch.load(), TorchBackend) and isinstance(on_ort.load(), OnnxBackend)
    photos = _photos()
    for photo in photos:
        assert abs(on_torch.predict(photo) - on_ort.predict(photo)) < 1e-3
    assert np.allclose(on_torch.predict_batch(photos), on_ort.predict_batch(photos), atol=1e-3)


def test_ocr_reads_the_same_text_on_both_engines() -> None:
    pytest.importorskip("rapidocr_onnxruntime")
    if not FONT.exists():
        pytest.skip("DejaVu fonts not installed (apt-get install fonts-dejavu-core)")
    from worker.fraud.contact import PpOcr

    photo = Image.fromarray(skimage.data.coffee()).convert("RGB")
    draw = ImageDraw.Draw(photo)
    font = ImageFont.truetype(str(FONT), 30)
    draw.text((20, 20), "Call +44 7911 123456", font=font, fill=(255, 255, 255), stroke_width=2,
              stroke_fill=(0, 0, 0))
    draw.text((20, 330), "deals.shop@gmail.com", font=font, fill=(255, 255, 255), stroke_width=2,
              stroke_fill=(0, 0, 0))
    on_torch, on_ort = _pair(PpOcr)
    assert on_torch.loaded_engine == "rapidocr-torch" and on_ort.loaded_engine == "rapidocr-onnxruntime"
    a, b = on_torch.predict(photo), on_ort.predict(photo)
    assert [line.text for line in a] == [line.text for line in b]
    assert any("7911" in line.text for line in a)
    for la, lb in zip(a, b, strict=True):
        assert abs(la.confidence - lb.confidence) < 1e-2
        assert np.allclose(la.box, lb.box, atol=2.0)
