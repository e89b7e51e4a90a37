"""One runtime, two engines: the same model contract runs on torch and on onnxruntime.

A tiny ONNX graph (per-channel scale, then the mean over the image) built in the test keeps
these fast; the real onnxruntime models (open_nsfw, PP-OCR) are checked in
tests/worker/fraud and test_bounded_inputs.
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

from worker.models.backends import Backend, OnnxBackend, PipelineBackend, TorchBackend
from worker.models.common import letterbox, to_tensor
from worker.models.runtime import Prepared, VisionModel
from worker.models.weights import file_digest, weights_digest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

SCALE = np.array([1.0, 2.0, 3.0], dtype=np.float32)
SIDE = 8


def _write_graph(path: Path, batch: int | str) -> Path:
    """y[n, c] = mean over (h, w) of x[n, c, h, w] * SCALE[c]; ``batch`` fixed (1) or symbolic."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, SIDE, SIDE])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])
    scale = numpy_helper.from_array(SCALE.reshape(1, 3, 1, 1), "scale")
    nodes = [helper.make_node("Mul", ["x", "scale"], ["scaled"]),
             helper.make_node("ReduceMean", ["scaled"], ["y"], axes=[2, 3], keepdims=0)]
    graph = helper.make_graph(nodes, "toy", [x], [y], initializer=[scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


class _ScaledMean(torch.nn.Module):
    """The same computation as the graph, in torch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * torch.from_numpy(SCALE).view(1, 3, 1, 1)).mean((2, 3))


class ToyModel(VisionModel[np.ndarray]):
    """One model definition; ``engine`` picks how it runs."""

    name = "toy"

    def __init__(self, path: Path, engine: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path, self.engine = path, engine

    def weights(self) -> Sequence[Path]:
        return [self.path]

    def _build(self) -> Backend | torch.nn.Module:
        return self.onnx_backend(self.path) if self.engine == "onnxruntime" else _ScaledMean()

    def prepare(self, image: Image.Image) -> Prepared:
        boxed, _, _ = letterbox(image, SIDE)
        return Prepared(to_tensor(boxed) / 255.0, {})

    def postprocess(self, output: Any, meta: dict[str, Any]) -> np.ndarray:
        assert isinstance(output, torch.Tensor) and output.dtype == torch.float32
        return output.numpy()


def _images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(2)
    return [Image.fromarray(rng.integers(0, 255, (9 + 5 * i, 12 + 3 * (i % 3), 3), dtype=np.uint8))
            for i in range(count)]


@pytest.fixture(scope="module")
def dynamic_graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_graph(tmp_path_factory.mktemp("onnx") / "dynamic.onnx", "batch")


@pytest.fixture(scope="module")
def fixed_graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_graph(tmp_path_factory.mktemp("onnx") / "fixed.onnx", 1)


def test_torch_and_onnxruntime_run_one_model_contract_alike(dynamic_graph: Path) -> None:
    on_torch = ToyModel(dynamic_graph, "torch")
    on_ort = ToyModel(dynamic_graph, "onnxruntime")
    images = _images(5)
    for a, b in zip(on_torch.predict_batch(images), on_ort.predict_batch(images), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert isinstance(on_torch.load(), TorchBackend) and isinstance(on_ort.load(), OnnxBackend)
    assert on_ort.load().engine == "onnxruntime" and "CPUExecutionProvider" in on_ort.load().describe()
    # The version is the weight file's digest, the same whichever engine runs it.
    assert on_torch.version == on_ort.version == f"toy@{file_digest(dynamic_graph)}"


def test_onnx_batch_equals_one_by_one_and_the_batcher_serves_it(dynamic_graph: Path) -> None:
    model = ToyModel(dynamic_graph, "onnxruntime", batch_max_size=4, batch_timeout_ms=50)
    images = _images(12)
    single = [model.predict(image) for image in images]
    for a, b in zip(single, model.predict_batch(images), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert model.load().max_batch is None and model.batching()
    barrier = threading.Barrier(len(images))

    def call(index: int) -> np.ndarray:
        barrier.wait()
        return model.infer(images[index])

    with ThreadPoolExecutor(len(images)) as pool:
        results = list(pool.map(call, range(len(images))))
    for got, want in zip(results, single, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    sizes = model._get_batcher().batch_sizes
    assert sum(sizes) == len(images) and 1 < max(sizes) <= 4, list(sizes)
    model.close()


def test_a_fixed_batch_graph_runs_one_item_per_forward(fixed_graph: Path) -> None:
    model = ToyModel(fixed_graph, "onnxruntime", batch_max_size=8)
    assert model.load().max_batch == 1
    assert not model.batching()  # nothing to gain from queueing: infer takes the direct path
    images = _images(3)
    together = model.predict_batch(images)  # three forwards of one, not an error
    for image, result in zip(images, together, strict=True):
        np.testing.assert_allclose(result, model.predict(image), rtol=1e-6)
    model.infer(images[0])
    assert model._batcher is None


def test_onnx_sessions_take_the_thread_setting(dynamic_graph: Path) -> None:
    backend = OnnxBackend(dynamic_graph, torch.device("cpu"), threads=1)
    assert backend.session.get_session_options().intra_op_num_threads == 1
    assert backend.device.type == "cpu"


def test_pipeline_backend_calls_one_item_at_a_time() -> None:
    seen: list[int] = []

    def double(item: int) -> int:
        seen.append(item)
        return item * 2

    backend = PipelineBackend(double, torch.device("cpu"))
    assert backend.forward([1, 2, 3]) == [2, 4, 6] and seen == [1, 2, 3]
    assert backend.max_batch == 1


def test_weights_digest_of_several_files_depends_on_each(tmp_path: Path) -> None:
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    a.write_bytes(b"first")
    b.write_bytes(b"second")
    assert weights_digest([a]) == file_digest(a)
    both = weights_digest([a, b])
    assert len(both) == 8 and both != weights_digest([b, a])
    b.write_bytes(b"changed")
    assert weights_digest([a, b]) != both
    with pytest.raises(ValueError):
        weights_digest([])
