"""One runtime for every vision model: lazy loading, device placement and dynamic batching.

Every model (tagger, detector, segmenter) subclasses :class:`VisionModel`. The subclass says
how to build the ``torch.nn.Module`` from local weight files, how to turn one PIL image into a
fixed-size tensor (plus the per-item facts needed to map results back, e.g. a letterbox
scale) and how to turn one row of the batched output into a result. The base class owns the
rest, identically for every model:

* **Lazy load behind a lock**: nothing is read from disk until the first prediction, so a
  Celery prefork parent never holds a model (or a CUDA context) that its children inherit. An
  ``os.register_at_fork`` hook forgets loaded models and batcher threads in a forked child in
  case a parent did load one (e.g. ``catalog process`` before starting workers).
* **Device** from ``Settings.device`` (``auto`` = CUDA when present), ``torch.inference_mode``
  around every forward and float16 autocast on CUDA.
* **Warm-up**: one dummy forward after loading so the first real image does not pay for
  kernel selection / allocator growth.
* **Dynamic batching**: :meth:`VisionModel.submit` hands one image to a per-model
  :class:`DynamicBatcher` thread, which runs one forward for up to ``batch_max_size`` items or
  ``batch_timeout_ms`` after the first item, whichever comes first. Each caller gets a
  ``Future`` with its own result; preprocessing errors are raised in the caller, a failed
  forward fails exactly the callers in that batch, a failed postprocess only its own caller.
  :meth:`VisionModel.predict` is the direct one-image-per-forward path (benchmark baseline).

Models are kept in a module-level registry (:func:`get_model`) so that each worker process
loads each model once, whichever step or thread asks first.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from PIL import Image

from worker.pipeline.contract import StepUnavailable

log = logging.getLogger(__name__)


R = TypeVar("R")


class ModelUnavailable(StepUnavailable):
    """The model's weights (package or file) are not installed; steps report ``unavailable``."""


def resolve_device(setting: str) -> torch.device:
    """``auto`` -> CUDA when a GPU is visible, else CPU. ``cuda`` without a GPU is an error
    (a silently slow CPU fallback on a GPU node hides a broken driver)."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CATALOG_DEVICE=cuda but torch sees no CUDA device")
    return torch.device(setting)


@dataclass
class Prepared:
    """One preprocessed item: the fixed-size input tensor and what postprocess needs."""

    tensor: torch.Tensor | Any
    meta: dict[str, Any]


class VisionModel(ABC, Generic[R]):
    """Base class of every model; subclasses implement ``_build``/``prepare``/``postprocess``."""

    #: short model name used in versions and logs, e.g. "efficientnet-lite0"
    name: str = "model"

    def __init__(
        self,
        device: str | torch.device = "cpu",
        batch_max_size: int = 8,
        batch_timeout_ms: float = 10.0,
        torch_threads: int | None = None,
    ) -> None:
        self.torch_threads = torch_threads
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.batch_max_size = max(1, int(batch_max_size))
        self.batch_timeout_ms = float(batch_timeout_ms)
        self._module: torch.nn.Module | None = None
        self._version: str | None = None
        self._lock = threading.Lock()
        self._batcher: DynamicBatcher[R] | None = None
        self._pid = os.getpid()

    # -- to implement ---------------------------------------------------------------
    @abstractmethod
    def _build(self) -> tuple[torch.nn.Module, str]:
        """Load weights from local files; return (module, version). Raise ModelUnavailable."""

    @abstractmethod
    def prepare(self, image: Image.Image) -> Prepared:
        """One RGB image -> fixed-size tensor (C, H, W) plus per-item metadata."""

    @abstractmethod
    def postprocess(self, output: Any, meta: dict[str, Any]) -> R:
        """One item's slice of the batched output -> the model's result for that image."""

    def collate(self, tensors: list[Any]) -> Any:
        """Batch the prepared tensors (torchvision detectors override: they take a list)."""
        return torch.stack(tensors)

    def split(self, output: Any, count: int) -> list[Any]:
        """Slice a batched output into per-item outputs (tensor, tuple/list or dict of them)."""
        return [_index(output, i) for i in range(count)]

    def warmup_image(self) -> Image.Image:
        return Image.new("RGB", (64, 48), (127, 127, 127))

    # -- loading ------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._module is not None

    def load(self) -> torch.nn.Module:
        self._check_fork()
        if self._module is None:
            with self._lock:
                if self._module is None:
                    started = time.perf_counter()
                    if self.torch_threads and torch.get_num_threads() != self.torch_threads:
                        torch.set_num_threads(self.torch_threads)  # process-wide, set before use
                    module, version = self._build()
                    module = module.to(self.device).eval()
                    for param in module.parameters():
                        param.requires_grad_(False)
                    self._run(module, [self.prepare(self.warmup_image())])  # warm-up
                    self._version = version
                    self._module = module
                    log.info("loaded %s (%s) on %s in %.0f ms", self.name, version, self.device,
                             (time.perf_counter() - started) * 1000)
        return self._module

    def _check_fork(self) -> None:
        # A model loaded before a fork is not reused by the child (CUDA contexts do not survive
        # fork; locks may be held by parent threads that do not exist here): start afresh.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._lock = threading.Lock()
            self._module = None
            self._batcher = None

    @property
    def version(self) -> str:
        self.load()
        assert self._version is not None
        return self._version

    # -- inference --------------------------------------------------------------------
    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return nullcontext()

    def forward_batch(self, items: list[Prepared]) -> list[Any]:
        """One forward pass over ``items``; returns per-item outputs as float32 on the CPU.
        Override when items may differ in shape (e.g. super-resolution tiles of several images)."""
        return self._run(self.load(), items)

    def _run(self, module: torch.nn.Module, items: list[Prepared]) -> list[Any]:
        batch = _to_device(self.collate([item.tensor for item in items]), self.device)
        with torch.inference_mode(), self._autocast():
            output = module(batch)
        return self.split(_to_cpu_float(output), len(items))

    def predict(self, image: Image.Image) -> R:
        """Direct path: one image, one forward (no batcher)."""
        item = self.prepare(image)
        return self.postprocess(self.forward_batch([item])[0], item.meta)

    def predict_batch(self, images: Sequence[Image.Image]) -> list[R]:
        """One forward pass for all ``images`` (any sizes)."""
        if not images:
            return []
        items = [self.prepare(image) for image in images]
        outputs = self.forward_batch(items)
        return [self.postprocess(out, item.meta) for out, item in zip(outputs, items)]

    def submit(self, image: Image.Image) -> Future[R]:
        """Queue one image on this model's dynamic batcher; the future holds its result."""
        self.load()  # load errors belong to the caller, not to the batcher thread
        item = self.prepare(image)
        return self._get_batcher().submit(item)

    def infer(self, image: Image.Image) -> R:
        """What steps call: batched when batching is on (max size > 1), else direct."""
        if self.batch_max_size <= 1:
            return self.predict(image)
        return self.submit(image).result()

    def _get_batcher(self) -> DynamicBatcher[R]:
        self._check_fork()
        if self._batcher is None or not self._batcher.alive:
            with self._lock:
                if self._batcher is None or not self._batcher.alive:
                    self._batcher = DynamicBatcher(
                        self.forward_batch, self.postprocess, self.batch_max_size,
                        self.batch_timeout_ms, name=f"batcher-{self.name}",
                    )
        return self._batcher

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
            self._batcher = None


class DynamicBatcher(Generic[R]):
    """Collects single items from many threads and runs them as one forward.

    A batch closes when it holds ``max_size`` items or ``timeout_ms`` have passed since its
    first item arrived. The forward and the per-item postprocessing run on the batcher's own
    thread; results and exceptions go to each caller's future.
    """

    _STOP = object()

    def __init__(
        self,
        forward: Callable[[list[Prepared]], list[Any]],
        postprocess: Callable[[Any, dict[str, Any]], R],
        max_size: int,
        timeout_ms: float,
        name: str = "batcher",
    ) -> None:
        self._forward = forward
        self._postprocess = postprocess
        self.max_size = max(1, max_size)
        self.timeout_s = max(0.0, timeout_ms) / 1000.0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pid = os.getpid()
        self.batch_sizes: deque[int] = deque(maxlen=10_000)  # recent batch sizes (tests, bench)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._pid == os.getpid() and self._thread.is_alive()

    def submit(self, item: Prepared) -> Future[R]:
        future: Future[R] = Future()
        self._queue.put((item, future))
        return future

    def close(self) -> None:
        if self.alive:
            self._queue.put(self._STOP)
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is self._STOP:
                return
            batch = [first]
            deadline = time.monotonic() + self.timeout_s
            stop = False
            while len(batch) < self.max_size:
                remaining = deadline - time.monotonic()
                try:
                    entry = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if entry is self._STOP:
                    stop = True
                    break
                batch.append(entry)
            self._run(batch)
            if stop:
                return

    def _run(self, batch: list[tuple[Prepared, Future[R]]]) -> None:
        live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
        if not live:
            return
        self.batch_sizes.append(len(live))
        try:
            outputs = self._forward([item for item, _ in live])
        except BaseException as exc:  # every caller of this forward gets the error
            for _, fut in live:
                fut.set_exception(exc)
            return
        for (item, fut), output in zip(live, outputs):
            try:
                fut.set_result(self._postprocess(output, item.meta))
            except BaseException as exc:
                fut.set_exception(exc)


_registry: dict[tuple[Any, ...], VisionModel[Any]] = {}


_registry_lock = threading.Lock()


def get_model(key: tuple[Any, ...], factory: Callable[[], VisionModel[R]]) -> VisionModel[R]:
    """The process-wide instance for ``key`` (model kind + everything that changes it)."""
    with _registry_lock:
        model = _registry.get(key)
        if model is None:
            model = _registry[key] = factory()
        return model


def clear_models() -> None:
    """Forget every model (tests; a forked child)."""
    with _registry_lock:
        for model in _registry.values():
            model.close()
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
    return 8 if resolve_device(settings.device).type == "cuda" else 1


def model_kwargs(settings: Any) -> dict[str, Any]:
    """The runtime arguments every model takes from Settings."""
    return {
        "device": settings.device,
        "batch_max_size": batch_size(settings),
        "batch_timeout_ms": settings.batch_timeout_ms,
        "torch_threads": settings.torch_threads,
    }


def _index(output: Any, i: int) -> Any:
    if isinstance(output, torch.Tensor):
        return output[i]
    if isinstance(output, dict):
        return {key: _index(value, i) for key, value in output.items()}
    if isinstance(output, (tuple, list)):
        return type(output)(_index(value, i) for value in output)
    raise TypeError(f"cannot split model output of type {type(output).__name__}")


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


def _to_cpu_float(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        output = output.detach()
        if output.is_floating_point():
            output = output.float()
        return output.cpu()
    if isinstance(output, dict):
        return {key: _to_cpu_float(value) for key, value in output.items()}
    if isinstance(output, (tuple, list)):
        return type(output)(_to_cpu_float(value) for value in output)
    return output
