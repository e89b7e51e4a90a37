"""Result writers: the explicit storage hook of a step.

Most steps need nothing beyond the generic rows that ``worker.pipeline.store`` writes for
every :class:`StepResult` (tags, detections, flags, artifacts, embedding, ``step_runs``). A
step that needs more -- its own table, or a look at what is already stored before its result
is final -- names a :class:`ResultWriter` in :data:`WRITER_REGISTRY` under its step name.
Writers live in ``worker.pipeline`` (steps never import the database) and run inside the one
short transaction that stores the image, after the listing row is locked and before the
generic rows are written, so what they add to the result (e.g. a flag) is stored with it.

The step passes its writer what it computed through :attr:`StepResult.handoff`; the writer
returns the result as it must be stored.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, replace
from typing import ClassVar, Protocol

from sqlalchemy.orm import Session

from worker.config import Settings
from worker.pipeline.contract import StepResult, StepRun
from worker.pipeline.store import is_retryable_db_error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteContext:
    """Where a writer runs: the store transaction's session, and the image as locked there."""

    session: Session
    image_id: int
    listing_id: int
    seller_id: str  # read under the listing lock, not when the image was claimed
    settings: Settings


class ResultWriter(Protocol):
    step: ClassVar[str]  # the step whose results it completes and stores

    def write(self, wctx: WriteContext, result: StepResult) -> StepResult:
        """Store what the generic rows do not hold and return the result to store (the same
        one, or a copy with e.g. flags and summary data added). Runs in the caller's
        transaction; must not commit."""
        ...


# step name -> "module:Class", imported lazily like STEP_REGISTRY.
WRITER_REGISTRY: dict[str, str] = {
    "duplicates": "worker.pipeline.duplicates:DuplicatesWriter",
}

_instances: dict[str, ResultWriter] = {}


def get_writer(step: str) -> ResultWriter | None:
    """The writer of ``step``, or None when the generic rows are all it stores."""
    target = WRITER_REGISTRY.get(step)
    if target is None:
        return None
    if step not in _instances:
        module_name, _, class_name = target.partition(":")
        writer: ResultWriter = getattr(importlib.import_module(module_name), class_name)()
        if writer.step != step:
            raise ValueError(f"writer {target} is registered for step {step!r} but declares {writer.step!r}")
        _instances[step] = writer
    return _instances[step]


def apply_writers(wctx: WriteContext, runs: list[StepRun]) -> list[StepRun]:
    """Run the writer of every step that succeeded; return the runs to store.

    Each writer runs in a SAVEPOINT: a writer that raises (a bug, a statement the database
    refuses) is undone alone and its step is recorded as ``failed``, like a step that raised
    while running, so one broken check never loses the other steps' results. Database errors
    that say nothing about the writer (unreachable database, lost connection, deadlock, lock
    timeout, an insert race: ``worker.pipeline.store.is_retryable_db_error``) propagate
    without a word about a failed step: the whole store is retried by the task.
    """
    out: list[StepRun] = []
    for run in runs:
        writer = get_writer(run.step) if run.status == "ok" and run.result is not None else None
        if writer is None or run.result is None:
            out.append(run)
            continue
        try:
            with wctx.session.begin_nested():
                result = writer.write(wctx, run.result)
        except Exception as exc:  # one broken writer must not lose the other steps' output
            if is_retryable_db_error(exc):
                raise
            log.exception("writer of step %s failed on image %s", run.step, wctx.image_id)
            out.append(replace(run, status="failed", result=None, error=f"{type(exc).__name__}: {exc}"))
            continue
        out.append(replace(run, result=result))
    return out
