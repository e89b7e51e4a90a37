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

**Which engine runs an ONNX graph** (:func:`onnx_engine`, ``CATALOG_ONNX_BACKEND``): ``auto``
picks onnxruntime on the CPU, where it measured 1.5-2x faster than the same graph converted to
torch (docs/benchmarks.md, ``python -m bench.backends``), and torch (``onnx2torch``) on CUDA,
where one batched torch runtime with autocast serves every model. Either way the model's
version is its weights file's digest: the engine changes how a forward runs, not what it
computes (outputs agree within 1e-4; masks IoU >= 0.99, checked in tests/worker/models).

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


ONNX_ENGINES = ("onnxruntime", "torch")


def onnx_engine(setting: str, device: torch.device) -> str:
    """The engine for an ONNX graph under ``CATALOG_ONNX_BACKEND`` (``setting``) on ``device``:
    ``auto`` = onnxruntime on the CPU, torch on CUDA; a forced engine as given."""
    if setting == "auto":
        return "torch" if device.type == "cuda" else "onnxruntime"
    if setting not in ONNX_ENGINES:
        raise ValueError(f"CATALOG_ONNX_BACKEND must be auto, onnxruntime or torch (got {setting!r})")
    return setting


_AUTOCAST = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": None}


def autocast_dtype_for(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype torch models run under (``CATALOG_AUTOCAST_DTYPE``): on CUDA the
    setting (float32 = none), on the CPU none (CPU autocast is slower for these convnets)."""
    if setting not in _AUTOCAST:
        raise ValueError(f"CATALOG_AUTOCAST_DTYPE must be float16, bfloat16 or float32 (got {setting!r})")
    if device.type != "cuda":
        return None
    dtype = _AUTOCAST[setting]
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise RuntimeError("CATALOG_AUTOCAST_DTYPE=bfloat16 but this GPU has no bfloat16 support: "
                           "use float16")
    return dtype


def onnx_to_torch(path: Path) -> torch.nn.Module:
    """The ONNX graph at ``path`` as a ``torch.nn.Module`` in eval mode (``onnx2torch``), with
    its Slice modules indexing by tuple (see :func:`tuple_slicing`)."""
    try:
        import onnx
        from onnx2torch import convert
    except ImportError as exc:
        raise ModelUnavailable(f"{Path(path).name} on torch needs onnx and onnx2torch: {exc}") from None
    model = _batchnorm_rank_hints(_constants_as_initializers(onnx.load(str(path))))
    return tuple_slicing(convert(model)).eval()


def _constants_as_initializers(model: Any) -> Any:
    """``Constant`` nodes holding a tensor become initializers. The PP-OCR exports keep their
    weights as Constant nodes, which onnx2torch does not read as weights (KeyError on the
    first convolution); the graph computes the same either way."""
    import onnx

    graph, kept = model.graph, []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return model


def _batchnorm_rank_hints(model: Any) -> Any:
    """Declare rank 4 on BatchNormalization inputs whose rank shape inference loses (after a
    dynamic Reshape in PP-OCRv4 rec): onnx2torch picks the BatchNorm module by that rank. Only
    inputs of unknown rank get the hint, and these convnets' BatchNorms are all 2-D."""
    import onnx
    from onnx import helper, shape_inference

    inferred = shape_inference.infer_shapes(model)
    ranks = {value.name: len(value.type.tensor_type.shape.dim)
             for value in [*inferred.graph.value_info, *inferred.graph.input]
             if value.type.tensor_type.HasField("shape")}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization" and not ranks.get(node.input[0]):
            model.graph.value_info.append(helper.make_tensor_value_info(
                node.input[0], onnx.TensorProto.FLOAT, ["n", "c", "h", "w"]))
    return model


def tuple_slicing(module: torch.nn.Module) -> torch.nn.Module:
    """Make onnx2torch's Slice modules index with tuples.

    onnx2torch 1.5.15 indexes with a *list* of slices, which torch deprecates (a UserWarning on
    every forward, and a different meaning in a future torch). Same semantics, tuple index.
    """
    from onnx2torch.node_converters.slice import OnnxSlice

    class _TupleSlice(OnnxSlice):  # type: ignore[misc]  # onnx2torch ships no type hints
        def forward(self, input_tensor: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
                    axes: torch.Tensor | None = None, steps: torch.Tensor | None = None) -> torch.Tensor:
            start_list, end_list = starts.tolist(), ends.tolist()
            axis_list = list(range(len(start_list))) if axes is None else axes.tolist()
            step_list = [1] * len(start_list) if steps is None else steps.tolist()
            index: list[Any] = [slice(None)] * input_tensor.dim()
            for start, end, axis, step in zip(start_list, end_list, axis_list, step_list, strict=True):
                if step < 1:
                    raise NotImplementedError("negative Slice steps are not used by our models")
                index[axis] = slice(start, end, step)
            return input_tensor[tuple(index)]

    for sub in module.modules():
        if type(sub) is OnnxSlice:
            sub.__class__ = _TupleSlice
    return module


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

    def __init__(self, module: torch.nn.Module, device: torch.device,
                 autocast_dtype: str = "float16") -> None:
        self.device = device
        self.autocast_dtype = autocast_dtype_for(autocast_dtype, device)
        self.module = module.to(device).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)

    def describe(self) -> str:
        cast = f", autocast {self.autocast_dtype}".replace("torch.", "") if self.autocast_dtype else ""
        return f"{self.engine} on {self.device}{cast}"

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is not None:
            return torch.autocast(self.device.type, dtype=self.autocast_dtype)
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


def onnx_session(path: Path, device: torch.device | str, threads: int | None,
                 model: bytes | None = None) -> Any:
    """An onnxruntime session for ``path`` (or the serialised graph ``model`` read from it) on
    ``device`` with at most ``threads`` intra-op threads (``CATALOG_TORCH_THREADS``, which
    ``catalog worker`` sets to cores / processes; unset = onnxruntime's default, all cores)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelUnavailable(f"{Path(path).name} runs on onnxruntime, which is not installed: {exc}") from None
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    device = resolve_device(device) if isinstance(device, str) else device
    return ort.InferenceSession(model if model is not None else str(path), opts,
                                providers=onnx_providers(device))


def symbolic_batch(path: Path) -> bytes:
    """The graph at ``path`` with a fixed batch dimension of 1 on its inputs and outputs made
    symbolic (``batch``), serialised. U²-Netp is exported with batch 1 everywhere; its
    operators are batch-agnostic, but onnxruntime checks the declared shapes and refuses a
    batch of 4 until the declaration says "any". Intermediate shape annotations are dropped
    too (onnxruntime infers them again)."""
    import onnx

    model = onnx.load(str(path))
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "batch"
    del model.graph.value_info[:]
    return bytes(model.SerializeToString())


class OnnxBackend(Backend):
    """One ONNX graph with one input, run by onnxruntime.

    ``outputs``: indices of the graph outputs to compute and return (default all; U²-Netp
    needs only the first of its seven). ``any_batch``: declare a batch dimension fixed to 1
    symbolic first (:func:`symbolic_batch`), so the batcher may send more than one item."""

    engine = "onnxruntime"

    def __init__(self, path: Path, device: torch.device, threads: int | None = None, *,
                 outputs: Sequence[int] | None = None, any_batch: bool = False) -> None:
        self.path = Path(path)
        self.session = onnx_session(self.path, device, threads,
                                    symbolic_batch(self.path) if any_batch else None)
        providers = self.session.get_providers()
        self.device = torch.device("cuda" if "CUDAExecutionProvider" in providers else "cpu")
        [graph_input] = self.session.get_inputs()
        self.input_name: str = graph_input.name
        names = [out.name for out in self.session.get_outputs()]
        self.output_names: list[str] | None = None if outputs is None else [names[i] for i in outputs]
        dim0 = graph_input.shape[0] if graph_input.shape else None
        # A symbolic or missing batch dimension accepts any batch; a fixed one does not.
        self.max_batch = int(dim0) if isinstance(dim0, int) else None

    def describe(self) -> str:
        return f"onnxruntime {self.session.get_providers()[0]}"

    def forward(self, batch: Any) -> Any:
        array = batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
        outputs = self.session.run(self.output_names,
                                   {self.input_name: np.ascontiguousarray(array, dtype=np.float32)})
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
