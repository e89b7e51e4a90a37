"""First analysis step: image metadata and 64-bit perceptual hashes (no model needed)."""

from __future__ import annotations

from typing import ClassVar

from worker.config import Settings
from worker.io.hashing import dhash, phash, to_hex
from worker.pipeline.contract import ImageContext, StepResult


class MetadataStep:
    name: ClassVar[str] = "metadata"
    requires: ClassVar[tuple[str, ...]] = ()
    VERSION: ClassVar[str] = "metadata@1"

    def version(self, settings: Settings) -> str:
        """A rules-only step: the version changes when its rules do."""
        return self.VERSION

    def run(self, ctx: ImageContext) -> StepResult:
        width, height = ctx.image.size
        return StepResult(
            data={
                "width": width,
                "height": height,
                "format": ctx.source_format,
                "size_bytes": len(ctx.raw),
                "sha256": ctx.sha256,
                "phash": to_hex(phash(ctx.image)),
                "dhash": to_hex(dhash(ctx.image)),
            }
        )
