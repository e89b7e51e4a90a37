"""Dynamic batching: single items from many threads run as one forward.

Used by :meth:`worker.models.runtime.VisionModel.submit`; it knows nothing about models,
only a ``forward`` over a list of prepared items and a per-item ``postprocess``.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from worker.observe import metrics

R = TypeVar("R")


@dataclass
class Prepared:
    """One preprocessed item: the model input (a tensor, or what the backend takes) and
    what postprocess needs to map the output back to the image."""

    tensor: torch.Tensor | Any
    meta: dict[str, Any]


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
        self.name = name
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
        metrics.batch_ran(self.name, len(live))
        try:
            outputs = self._forward([item for item, _ in live])
        except BaseException as exc:  # noqa: BLE001 - every caller of this forward gets the error
            for _, fut in live:
                fut.set_exception(exc)
            return
        for (item, fut), output in zip(live, outputs, strict=True):
            try:
                fut.set_result(self._postprocess(output, item.meta))
            except BaseException as exc:  # noqa: BLE001 - delivered to its own caller only
                fut.set_exception(exc)
