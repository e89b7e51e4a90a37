"""How a loaded model runs: the engines behind :class:`worker.models.runtime.VisionModel`.

A model says *what* it computes (prepare an image, postprocess one output); a backend says
*how* one forward runs on an already collated batch. Three backends share one small
interface (``forward``, ``max_batch``, ``device``, ``describe``):

* :class:`TorchBackend`: a ``torch.nn.Module`` on the configured device, under
  ``torch.inference_mode`` and, on CUDA, float16 autocast. Outputs come back as float32 CPU
  tensors.
* :class:`OnnxBackend`: an onnxruntime ``InferenceSession`` (CUDA execution provider when
  the device resolves to CUDA and this onnxruntime build has it, else CPU; the same thread
  setting as torch). A graph whose batch dimension is fixed to 1 runs one item per call.
  Outputs come back as CPU tensors too, so models split and postprocess them alike.
* :class:`PipelineBackend`: a library pipeline that takes one item at a time and brings its
  own sessions and pre/post-processing (PP-OCR through rapidocr). It never batches.

Backends are built by a model's ``_build`` from local files only, inside the runtime's load
lock; nothing here downloads or loads at import time.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.models.weights import ModelUnavailable

log = logging.getLogger(__name__)


def resolve_device(setting: str) -> torch.device:
    """``auto`` -> CUDA when a GPU is visible, else CPU. ``cuda`` without a GPU is an error
    (a silently slow CPU fallback on a GPU node hides a broken driver)."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CATALOG_DEVICE=cuda but torch sees no CUDA device")
    return torch.device(setting)


class Backend(ABC):
    """One loaded model, ready to run forwards. Thread-safe for concurrent ``forward`` calls
    (torch modules in inference mode and onnxruntime sessions both are)."""

    #: the engine's name, for logs and benchmarks: "torch", "onnxruntime", ...
    engine: str = "backend"
    #: where the forward runs (an onnxruntime session without a CUDA provider is "cpu")
    device: torch.device = torch.device("cpu")
    #: the most items one ``forward`` accepts; None = any number. 1 turns the batcher off.
    max_batch: int | None = None

    @abstractmethod
    def forward(self, batch: Any) -> Any:
        """One forward over a collated batch; outputs on the CPU, floats as float32."""

    def describe(self) -> str:
        return f"{self.engine} on {self.device}"


class TorchBackend(Backend):
    """A ``torch.nn.Module`` in eval mode without gradients, moved to ``device``."""

    engine = "torch"

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self.module = module.to(device).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return nullcontext()

    def forward(self, batch: Any) -> Any:
        batch = _to_device(batch, self.device)
        with torch.inference_mode(), self._autocast():
            output = self.module(batch)
        return to_cpu_float(output)


def onnx_providers(device: torch.device) -> list[str]:
    """Execution providers for ``device``: CUDA first when wanted and built in, CPU always."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        else:
            log.warning("CATALOG_DEVICE resolves to CUDA but this onnxruntime build has no CUDA "
                        "provider (install onnxruntime-gpu); onnxruntime models run on the CPU")
    return providers


def onnx_session(path: Path, device: torch.device | str, threads: int | None) -> Any:
    """An onnxruntime session for ``path`` on ``device`` with at most ``threads`` intra-op
    threads (``CATALOG_TORCH_THREADS``; unset = onnxruntime's default, all cores)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelUnavailable(f"{Path(path).name} runs on onnxruntime, which is not installed: {exc}") from None
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    device = resolve_device(device) if isinstance(device, str) else device
    return ort.InferenceSession(str(path), opts, providers=onnx_providers(device))


class OnnxBackend(Backend):
    """One ONNX graph with one input, run by onnxruntime."""

    engine = "onnxruntime"

    def __init__(self, path: Path, device: torch.device, threads: int | None = None) -> None:
        self.path = Path(path)
        self.session = onnx_session(self.path, device, threads)
        providers = self.session.get_providers()
        self.device = torch.device("cuda" if "CUDAExecutionProvider" in providers else "cpu")
        [graph_input] = self.session.get_inputs()
        self.input_name: str = graph_input.name
        dim0 = graph_input.shape[0] if graph_input.shape else None
        # A symbolic or missing batch dimension accepts any batch; a fixed one does not.
        self.max_batch = int(dim0) if isinstance(dim0, int) else None

    def describe(self) -> str:
        return f"onnxruntime {self.session.get_providers()[0]}"

    def forward(self, batch: Any) -> Any:
        array = batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
        outputs = self.session.run(None, {self.input_name: np.ascontiguousarray(array, dtype=np.float32)})
        tensors = [to_cpu_float(torch.from_numpy(np.asarray(out))) for out in outputs]
        return tensors[0] if len(tensors) == 1 else tuple(tensors)


class PipelineBackend(Backend):
    """A callable that processes ONE item (its own sessions, pre- and post-processing).

    ``forward`` takes a list of items (the model's ``collate`` must keep items in a list)
    and calls the pipeline on each; ``max_batch`` is 1, so the runtime never queues items
    for it on a batcher.
    """

    engine = "pipeline"
    max_batch = 1

    def __init__(self, run: Callable[[Any], Any], device: torch.device, engine: str = "pipeline") -> None:
        self.run = run
        self.device = device
        self.engine = engine

    def forward(self, batch: Any) -> Any:
        items: Sequence[Any] = batch
        return [self.run(item) for item in items]


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


def to_cpu_float(output: Any) -> Any:
    """Detach, move to the CPU and widen floating tensors to float32, recursively."""
    if isinstance(output, torch.Tensor):
        output = output.detach()
        if output.is_floating_point():
            output = output.float()
        return output.cpu()
    if isinstance(output, dict):
        return {key: to_cpu_float(value) for key, value in output.items()}
    if isinstance(output, (tuple, list)):
        return type(output)(to_cpu_float(value) for value in output)
    return output
