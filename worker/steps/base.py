"""The base of the steps that run one runtime model (detection, segmentation).
"""

from __future__ import annotations

import threading
from typing import Any, Generic, TypeVar

from worker.models.runtime import VisionModel

R = TypeVar("R")


class ModelStep(Generic[R]):
    """Base of a pipeline step backed by one runtime model chosen from the settings.

    The model is resolved on every run (a registry lookup, so it loads once per process and
    follows a settings change), and its version is the step's version.
    """

    requires: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._model: VisionModel[R] | None = None
        self._lock = threading.Lock()

    def build(self, settings: Any) -> VisionModel[R]:
        raise NotImplementedError

    def model(self, settings: Any) -> VisionModel[R]:
        with self._lock:
            self._model = self.build(settings)
            return self._model

    def version(self, settings: Any) -> str:
        return self.model(settings).version
