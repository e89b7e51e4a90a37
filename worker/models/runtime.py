"""One runtime for every model: lazy loading, device and threads, dynamic batching, versions.

Every model (tagger, detector, segmenter, super-resolution, NSFW classifier, OCR) subclasses
:class:`VisionModel`. The subclass says **what it computes**:

* ``weights()``: the local files it loads; their SHA-256 prefix is the model's version
  (``<name>@<digest>``), computed from the files alone, without loading anything;
* ``_build()``: load those files into something that runs: a ``torch.nn.Module`` (run by
  :class:`~worker.models.backends.TorchBackend`) or any other
  :class:`~worker.models.backends.Backend` (e.g. ``self.onnx_backend(path)`` for an ONNX
  graph on onnxruntime, or a one-item library pipeline);
* ``prepare(image)``: one PIL image -> a bounded, fixed-size input plus the per-item facts
  needed to map results back (a letterbox scale, the original size);
* ``postprocess(output, meta)``: one item's output -> the model's result for that image.

The base class owns **how it runs**, identically for every model and engine:

* **Lazy load behind a lock**: nothing is read from disk until the first prediction, so a
  Celery prefork parent never holds a model (or a CUDA context) that its children inherit. An
  ``os.register_at_fork`` hook forgets loaded models and batcher threads in a forked child in
  case a parent did load one (e.g. ``catalog process`` before starting workers).
* **Device and threads** from ``Settings.device`` (``auto`` = CUDA when present) and
  ``Settings.torch_threads`` (torch's intra-op pool; the intra-op threads of onnxruntime
  sessions).
* **Engine per device** for models that ship as ONNX graphs (:meth:`VisionModel.onnx_model`,
  ``Settings.onnx_backend``): onnxruntime on the CPU, torch on CUDA by default; steps never
  know which one runs. Torch models on CUDA run under autocast (``Settings.autocast_dtype``).
* **Warm-up**: one dummy forward after loading so the first real image does not pay for
  kernel selection / allocator growth.
* **Dynamic batching** where the backend takes batches: :meth:`VisionModel.submit` hands one
  image to a per-model :class:`~worker.models.batcher.DynamicBatcher` thread, which runs one
  forward for up to ``batch_max_size`` items or ``batch_timeout_ms`` after the first item.
  Preprocessing errors are raised in the caller, a failed forward fails exactly the callers
  in that batch, a failed postprocess only its own caller. :meth:`VisionModel.predict` is the
  direct one-image-per-forward path.

Models live in one process-wide registry (:func:`get_model`, :func:`model_for`) so that each
worker process loads each model once, whichever step or thread asks first. The registry also
holds other per-process resources a step would otherwise cache itself (:func:`get_shared`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from PIL import Image

from worker.config import CUDA_BATCH_DEFAULT
from worker.models.backends import (
    Backend,
    OnnxBackend,
    TorchBackend,
    onnx_engine,
    onnx_to_torch,
    resolve_device,
)
from worker.models.batcher import DynamicBatcher, Prepared
from worker.models.weights import ModelUnavailable, weights_digest

__all__ = [
    "DynamicBatcher", "ModelUnavailable", "Prepared", "VisionModel", "batch_size", "clear_models",
    "get_model", "get_shared", "model_for", "model_kwargs", "resolve_device",
]

log = logging.getLogger(__name__)

R = TypeVar("R")
T = TypeVar("T")
M = TypeVar("M", bound="VisionModel[Any]")


class VisionModel(ABC, Generic[R]):
    """Base class of every model; subclasses implement ``weights``/``_build``/``prepare``/
    ``postprocess`` (and ``collate``/``split`` when items are not same-shape tensors)."""

    #: short model name used in versions and logs, e.g. "efficientnet-lite0"
    name: str = "model"
    #: hex digits of the weights digest in the version
    digest_length: int = 8

    def __init__(
        self,
        device: str | torch.device = "cpu",
        batch_max_size: int = 8,
        batch_timeout_ms: float = 10.0,
        torch_threads: int | None = None,
        onnx_engine: str = "auto",
        autocast_dtype: str = "float16",
    ) -> None:
        self.torch_threads = torch_threads
        self.onnx_engine_setting = onnx_engine
        self.autocast_dtype = autocast_dtype
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.batch_max_size = max(1, int(batch_max_size))
        self.batch_timeout_ms = float(batch_timeout_ms)
        self._backend: Backend | None = None
        self._version: str | None = None
        self._lock = threading.Lock()
        self._batcher: DynamicBatcher[R] | None = None
        self._pid = os.getpid()

    # -- what the model computes (to implement) --------------------------------------------
    @abstractmethod
    def weights(self) -> Sequence[Path]:
        """The local files the model loads (their digest is the version). Raise
        ModelUnavailable when they are not installed."""

    @abstractmethod
    def _build(self) -> Backend | torch.nn.Module:
        """Load ``weights()`` into a module (run by torch) or a backend. Raise ModelUnavailable."""

    @abstractmethod
    def prepare(self, image: Image.Image) -> Prepared:
        """One RGB image -> a bounded, fixed-size model input plus per-item metadata."""

    @abstractmethod
    def postprocess(self, output: Any, meta: dict[str, Any]) -> R:
        """One item's slice of the batched output -> the model's result for that image."""

    @property
    def version_label(self) -> str:
        """The name part of the version (defaults to ``name``)."""
        return self.name

    def collate(self, tensors: list[Any]) -> Any:
        """Batch the prepared inputs (torchvision detectors and pipelines take a list)."""
        return torch.stack(tensors)

    def split(self, output: Any, count: int) -> list[Any]:
        """Slice a batched output into per-item outputs (tensor, tuple/list or dict of them)."""
        return [_index(output, i) for i in range(count)]

    def warmup_image(self) -> Image.Image:
        return Image.new("RGB", (64, 48), (127, 127, 127))

    def onnx_backend(self, path: Path) -> OnnxBackend:
        """An onnxruntime backend for ``path`` with this model's device and threads."""
        return OnnxBackend(path, self.device, self.torch_threads)

    @property
    def onnx_engine(self) -> str:
        """The engine :meth:`onnx_model` picks here: ``onnxruntime`` or ``torch``."""
        return onnx_engine(self.onnx_engine_setting, self.device)

    def onnx_model(self, path: Path, *, outputs: Sequence[int] | None = None, any_batch: bool = False,
                   wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                   ) -> Backend | torch.nn.Module:
        """An ONNX graph on the engine for this device (:attr:`onnx_engine`): an onnxruntime
        backend computing ``outputs`` (indices; default all), or the graph converted to a
        torch module, passed through ``wrap`` (which must return the same outputs).
        ``any_batch``: the graph declares batch 1 but runs any batch (U²-Netp)."""
        if self.onnx_engine == "torch":
            module = onnx_to_torch(path)
            return wrap(module) if wrap is not None else module
        return OnnxBackend(path, self.device, self.torch_threads, outputs=outputs, any_batch=any_batch)

    @property
    def loaded_engine(self) -> str:
        """The engine of the loaded backend (``torch``, ``onnxruntime``, ...); loads it."""
        return self.load().engine

    # -- version and loading -------------------------------------------------------------
    @property
    def version(self) -> str:
        """``<version_label>@<weights digest>``, from the weight files only: never loads the
        model (steps report versions even for images they do not run on)."""
        if self._version is None:
            self._version = f"{self.version_label}@{weights_digest(self.weights(), self.digest_length)}"
        return self._version

    @property
    def loaded(self) -> bool:
        return self._backend is not None

    def load(self) -> Backend:
        """The loaded backend, loading it on first use (once per process, behind a lock)."""
        self._check_fork()
        backend = self._backend
        if backend is None:
            with self._lock:
                if self._backend is None:
                    self._backend = self._load()
                backend = self._backend
        return backend

    def _load(self) -> Backend:
        started = time.perf_counter()
        if self.torch_threads and torch.get_num_threads() != self.torch_threads:
            torch.set_num_threads(self.torch_threads)  # process-wide, set before first use
        built = self._build()
        backend = built if isinstance(built, Backend) else TorchBackend(built, self.device, self.autocast_dtype)
        self._forward(backend, [self.prepare(self.warmup_image())])  # warm-up
        log.info("loaded %s (%s) with %s in %.0f ms", self.name, self.version, backend.describe(),
                 (time.perf_counter() - started) * 1000)
        return backend

    def _check_fork(self) -> None:
        # A model loaded before a fork is not reused by the child (CUDA contexts do not survive
        # fork; locks may be held by parent threads that do not exist here): start afresh.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._lock = threading.Lock()
            self._backend = None
            self._batcher = None

    # -- inference ----------------------------------------------------------------------
    def forward_batch(self, items: list[Prepared]) -> list[Any]:
        """Forward ``items`` (as few forwards as the backend allows); per-item outputs on the
        CPU. Override when items may differ in shape (super-resolution tiles of several images)."""
        return self._forward(self.load(), items)

    def _forward(self, backend: Backend, items: list[Prepared]) -> list[Any]:
        size = max(1, backend.max_batch or len(items))
        outputs: list[Any] = []
        for start in range(0, len(items), size):
            chunk = items[start:start + size]
            output = backend.forward(self.collate([item.tensor for item in chunk]))
            outputs.extend(self.split(output, len(chunk)))
        return outputs

    def predict(self, image: Image.Image) -> R:
        """Direct path: one image, one forward (no batcher)."""
        item = self.prepare(image)
        return self.postprocess(self.forward_batch([item])[0], item.meta)

    def predict_batch(self, images: Sequence[Image.Image]) -> list[R]:
        """One forward pass for all ``images`` (any sizes), where the backend takes batches."""
        if not images:
            return []
        items = [self.prepare(image) for image in images]
        outputs = self.forward_batch(items)
        return [self.postprocess(out, item.meta) for out, item in zip(outputs, items, strict=True)]

    def batching(self) -> bool:
        """Whether :meth:`infer` queues on the batcher: batching is configured (max size > 1)
        and the loaded backend takes more than one item per forward."""
        limit = self.load().max_batch
        return self.batch_max_size > 1 and (limit is None or limit > 1)

    def submit(self, image: Image.Image) -> Future[R]:
        """Queue one image on this model's dynamic batcher; the future holds its result."""
        self.load()  # load errors belong to the caller, not to the batcher thread
        item = self.prepare(image)
        return self._get_batcher().submit(item)

    def infer(self, image: Image.Image) -> R:
        """What steps call: batched when batching is on and possible, else direct."""
        if not self.batching():
            return self.predict(image)
        return self.submit(image).result()

    def _get_batcher(self) -> DynamicBatcher[R]:
        self._check_fork()
        if self._batcher is None or not self._batcher.alive:
            limit = self.load().max_batch
            with self._lock:
                if self._batcher is None or not self._batcher.alive:
                    self._batcher = DynamicBatcher(
                        self.forward_batch, self.postprocess,
                        min(self.batch_max_size, limit or self.batch_max_size),
                        self.batch_timeout_ms, name=f"batcher-{self.name}",
                    )
        return self._batcher

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
            self._batcher = None


# --- the process-wide registry ------------------------------------------------------------

_registry: dict[tuple[Any, ...], Any] = {}
_registry_lock = threading.Lock()


def get_shared(key: tuple[Any, ...], factory: Callable[[], T]) -> T:
    """The process-wide object for ``key`` (built once by ``factory``). A factory that raises
    stores nothing, so the next caller tries again (e.g. after the weights are installed)."""
    with _registry_lock:
        if key not in _registry:
            _registry[key] = factory()
        value: T = _registry[key]
        return value


def get_model(key: tuple[Any, ...], factory: Callable[[], VisionModel[R]]) -> VisionModel[R]:
    """The process-wide instance for ``key`` (model kind + everything that changes it)."""
    return get_shared(key, factory)


def model_for(settings: Any, key: tuple[Any, ...], build: Callable[..., M]) -> M:
    """The process-wide model for ``key`` under the runtime part of ``settings`` (device,
    batching, threads): ``build(**model_kwargs(settings))`` on first use. The key always
    holds every runtime argument, so two settings objects never share a differently
    configured model."""
    kwargs = model_kwargs(settings)
    return get_shared((*key, *sorted(kwargs.items())), lambda: build(**kwargs))


def clear_models() -> None:
    """Forget every model and shared resource (tests; a forked child)."""
    with _registry_lock:
        for value in _registry.values():
            close = getattr(value, "close", None)
            if callable(close):
                close()
        _registry.clear()


def _after_fork_in_child() -> None:
    # Threads do not survive fork and CUDA contexts must not be shared: start afresh.
    global _registry_lock
    _registry_lock = threading.Lock()
    _registry.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def batch_size(settings: Any) -> int:
    """CATALOG_BATCH_MAX_SIZE, or the measured default: 8 on CUDA, 1 on CPU (docs/benchmarks.md:
    on CPU a batch costs as much per image as single forwards, and the batcher serialises)."""
    if settings.batch_max_size is not None:
        return int(settings.batch_max_size)
    return CUDA_BATCH_DEFAULT if resolve_device(settings.device).type == "cuda" else 1


def model_kwargs(settings: Any) -> dict[str, Any]:
    """The runtime arguments every model takes from Settings."""
    return {
        "device": settings.device,
        "batch_max_size": batch_size(settings),
        "batch_timeout_ms": settings.batch_timeout_ms,
        "torch_threads": settings.torch_threads,
        "onnx_engine": getattr(settings, "onnx_backend", "auto"),
        "autocast_dtype": getattr(settings, "autocast_dtype", "float16"),
    }


def _index(output: Any, i: int) -> Any:
    if isinstance(output, torch.Tensor):
        return output[i]
    if isinstance(output, dict):
        return {key: _index(value, i) for key, value in output.items()}
    if isinstance(output, (tuple, list)):
        return type(output)(_index(value, i) for value in output)
    raise TypeError(f"cannot split model output of type {type(output).__name__}")
