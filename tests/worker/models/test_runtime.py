"""The model runtime: device choice, loading once, dynamic batching and its error routing.

A tiny deterministic model keeps these tests fast; the real models' batch-vs-single
equality is checked in test_tagging/test_detect/test_segment.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from worker.config import load_settings
from worker.models.common import file_digest, letterbox, package_file, to_tensor
from worker.models.runtime import (
    ModelUnavailable,
    Prepared,
    VisionModel,
    clear_models,
    get_model,
    model_kwargs,
    resolve_device,
)


class _Poisonable(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.isnan(x).any():
            raise RuntimeError("poisoned batch")
        return self.conv(x)


class ToyModel(VisionModel[np.ndarray]):
    """Letterboxes to 32 px and returns the 4 channel means; counts its loads."""

    name = "toy"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.builds = 0

    def weights(self) -> Sequence[Path]:
        return [Path(__file__)]  # any file: the version is its digest

    def _build(self) -> torch.nn.Module:
        self.builds += 1
        return _Poisonable()

    def prepare(self, image: Image.Image) -> Prepared:
        if image.info.get("unreadable"):
            raise ValueError("cannot prepare this image")
        boxed, scale, pad = letterbox(image, 32)
        tensor = to_tensor(boxed) / 255.0
        if image.info.get("poison"):
            tensor[0, 0, 0] = float("nan")
        return Prepared(tensor, {"fail": image.info.get("fail_post"), "scale": scale})

    def postprocess(self, output: Any, meta: dict[str, Any]) -> np.ndarray:
        if meta["fail"]:
            raise KeyError(meta["fail"])
        return output.mean((1, 2)).numpy()


def _images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [
        Image.fromarray(rng.integers(0, 255, (20 + 7 * i, 30 + 5 * (i % 4), 3), dtype=np.uint8))
        for i in range(count)
    ]


def test_auto_device_is_cpu_without_cuda() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            resolve_device("cuda")


def test_settings_feed_the_runtime() -> None:
    settings = load_settings(device="cpu", batch_max_size=4, batch_timeout_ms=2.5)
    model = ToyModel(**model_kwargs(settings))
    assert (model.device.type, model.batch_max_size, model.batch_timeout_ms) == ("cpu", 4, 2.5)
    assert load_settings().batch_max_size is None and load_settings().batch_timeout_ms == 10
    # Unset, the batch size follows the device: batching only pays on a GPU (docs/benchmarks.md).
    from worker.models.runtime import batch_size

    assert batch_size(load_settings(device="cpu")) == 1
    assert batch_size(load_settings(device="cpu", batch_max_size=8)) == 8


def test_loads_lazily_once_and_registry_shares_instances() -> None:
    clear_models()
    first = get_model(("toy", 1), ToyModel)
    assert not first.loaded  # nothing loads until the first prediction (fork safety)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(first.predict, _images(8)))
    assert isinstance(first, ToyModel)
    assert first.builds == 1 and first.version == f"toy@{file_digest(Path(__file__))}"
    assert get_model(("toy", 1), ToyModel) is first
    clear_models()
    assert get_model(("toy", 1), ToyModel) is not first
    clear_models()


def test_batch_equals_one_by_one_for_different_sizes() -> None:
    model = ToyModel()
    images = _images(6)
    single = [model.predict(image) for image in images]
    batched = model.predict_batch(images)
    for a, b in zip(single, batched, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_concurrent_callers_each_get_their_own_result() -> None:
    model = ToyModel(batch_max_size=4, batch_timeout_ms=50)
    images = _images(16)
    expected = [model.predict(image) for image in images]
    barrier = threading.Barrier(16)

    def call(index: int) -> tuple[int, np.ndarray]:
        barrier.wait()
        return index, model.infer(images[index])

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(16)))
    for index, result in results:
        np.testing.assert_allclose(result, expected[index], rtol=1e-5, atol=1e-6)
    sizes = model._get_batcher().batch_sizes
    assert sum(sizes) == 16 and max(sizes) <= 4
    assert max(sizes) > 1, f"threads were never batched together: {sizes}"
    model.close()


def test_batch_closes_after_the_timeout() -> None:
    model = ToyModel(batch_max_size=8, batch_timeout_ms=5)
    future = model.submit(_images(1)[0])
    assert future.result(timeout=5).shape == (4,)  # alone, after ~5 ms, not waiting for 7 more
    assert list(model._get_batcher().batch_sizes) == [1]
    model.close()


def test_errors_reach_exactly_the_right_callers() -> None:
    model = ToyModel(batch_max_size=8, batch_timeout_ms=300)
    good, bad_post, poison, unreadable = _images(4)
    bad_post.info["fail_post"] = "only-me"
    poison.info["poison"] = True
    unreadable.info["unreadable"] = True

    # Preprocessing errors are raised in the caller; nothing is queued.
    with pytest.raises(ValueError, match="cannot prepare"):
        model.submit(unreadable)

    # A postprocess error fails only its own caller.
    futures = [model.submit(good), model.submit(bad_post), model.submit(good.copy())]
    assert futures[0].result(timeout=5).shape == (4,)
    with pytest.raises(KeyError, match="only-me"):
        futures[1].result(timeout=5)
    assert futures[2].result(timeout=5).shape == (4,)

    # A failed forward fails every caller of that forward, and the batcher keeps serving.
    futures = [model.submit(good), model.submit(poison)]
    for future in futures:
        with pytest.raises(RuntimeError, match="poisoned batch"):
            future.result(timeout=5)
    assert model.infer(good).shape == (4,)
    model.close()


def test_direct_path_when_batching_is_off() -> None:
    model = ToyModel(batch_max_size=1)
    model.infer(_images(1)[0])
    assert model._batcher is None


def test_letterbox_keeps_the_scale_to_map_back() -> None:
    image = Image.new("RGB", (200, 100))
    boxed, scale, (left, top) = letterbox(image, 64)
    assert boxed.size == (64, 64) and scale == pytest.approx(0.32)
    assert (left, top) == (0, 16)
    # the original's bottom-right corner maps back from the letterboxed one
    assert ((64 - left) / scale, (64 - 16 - top) / scale) == pytest.approx((200, 100))


def test_missing_weights_package_is_unavailable() -> None:
    with pytest.raises(ModelUnavailable, match="not installed"):
        package_file("no_such_weights_package_xyz", "model.pth")


def test_forked_child_forgets_the_parents_models() -> None:
    """A child must not reuse the parent's module, batcher thread or registry. (It must not
    run torch compute either when the parent already did: torch's OpenMP pool hangs after
    fork. That is why models load lazily, in the worker child, never in the parent.)"""
    import os

    from worker.models import runtime

    model = get_model(("toy", "fork"), lambda: ToyModel(batch_max_size=4, batch_timeout_ms=1))
    model.infer(_images(1)[0])  # loaded, batcher thread running in the parent
    parent_backend = model._backend
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            model._check_fork()
            fresh = model._backend is None and model._batcher is None
            code = 0 if fresh and not runtime._registry else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert model._backend is parent_backend and runtime._registry
    clear_models()
