"""The base of the steps that run one runtime model (detection, segmentation).
"""

from __future__ import annotations

from typing import Any, ClassVar, Generic, TypeVar

from worker.models.runtime import VisionModel

R = TypeVar("R")


class ModelStep(Generic[R]):
    """Base of a pipeline step backed by one runtime model chosen from the task's settings.

    The step keeps no model of its own: :meth:`build` looks the model up in the runtime's
    process-wide registry on every call (so it loads once per process and follows the
    settings each task passes), and the model's version, a digest of its weight files, is
    the step's version. Neither reads the global settings nor loads the model.
    """

    requires: ClassVar[tuple[str, ...]] = ()

    def build(self, settings: Any) -> VisionModel[R]:
        raise NotImplementedError

    def model(self, settings: Any) -> VisionModel[R]:
        return self.build(settings)

    def version(self, settings: Any) -> str:
        return self.model(settings).version
