"""The step registry and the runner that applies the configured steps to one image.

A step that stores more than the generic rows also has a writer in
``worker.pipeline.writers.WRITER_REGISTRY`` (same step name).
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time

from worker.config import Settings
from worker.observe import metrics
from worker.pipeline.contract import ImageContext, Step, StepRun, StepUnavailable
from worker.pipeline.store import is_retryable_db_error

log = logging.getLogger(__name__)


# name -> "module:Class". Steps are imported lazily so a worker only loads what it runs.
STEP_REGISTRY: dict[str, str] = {
    # fraud checks (issue 5, worker/fraud/)
    "duplicates": "worker.fraud.duplicates:DuplicatesStep",
    "contact_info": "worker.fraud.contact:ContactInfoStep",
    "nsfw": "worker.fraud.nsfw:NsfwStep",
    "tamper": "worker.fraud.tamper:TamperStep",
    "category": "worker.fraud.category:CategoryStep",
    "quality": "worker.fraud.quality:QualityStep",
    "metadata": "worker.steps.metadata:MetadataStep",
    "superres": "worker.steps.superres:SuperResStep",
    "tagging": "worker.steps.tagging:TaggingStep",
    "detection": "worker.steps.detection:DetectionStep",
    "segmentation": "worker.steps.segmentation:SegmentationStep",
    # visual search: the product-region embedding (issue 11, worker/search/)
    "embedding": "worker.steps.embedding:EmbeddingStep",
}


_instances: dict[str, Step] = {}


def get_step(name: str) -> Step:
    """One instance per process, so models load once per worker process."""
    if name not in _instances:
        try:
            target = STEP_REGISTRY[name]
        except KeyError:
            raise ValueError(
                f"unknown step {name!r}; known steps: {', '.join(sorted(STEP_REGISTRY))}"
            ) from None
        module_name, _, class_name = target.partition(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        _instances[name] = cls()
    return _instances[name]


def validate_steps(names: list[str]) -> None:
    for name in names:
        if name not in STEP_REGISTRY:
            raise ValueError(f"unknown step {name!r}; known steps: {', '.join(sorted(STEP_REGISTRY))}")


_blas_limited: int | None = None  # the pid whose BLAS pool was limited
_blas_lock = threading.Lock()


def limit_blas_threads() -> None:
    """One BLAS thread in this process, unless ``OPENBLAS_NUM_THREADS`` (or ``OMP_NUM_THREADS``,
    ``MKL_NUM_THREADS``) says otherwise. The steps' numpy matrix products are small (hash
    reductions, k-means over 8192 points): OpenBLAS's default pool of one thread per core made
    them 5-10x slower in wall time on 2 cores (waking and spinning threads for products of a
    few hundred rows) and competes with the models' own threads and the other worker
    processes. Parallelism comes from worker processes and the models' intra-op threads.
    Once per process (a forked pool child limits its own)."""
    global _blas_limited
    if _blas_limited == os.getpid():
        return
    with _blas_lock:
        if _blas_limited == os.getpid():
            return
        if not any(os.environ.get(var) for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")):
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=1, user_api="blas")
        _blas_limited = os.getpid()


def run_steps(ctx: ImageContext, names: list[str]) -> list[StepRun]:
    """Run the configured steps in order. A failing or unavailable step is recorded and the
    next one still runs; steps whose requirements did not succeed are skipped. No database
    is involved: the caller runs this with no transaction open."""
    limit_blas_threads()
    runs: list[StepRun] = []
    settings = ctx.settings
    for name in names:
        step = get_step(name)
        missing = [req for req in step.requires if req not in ctx.results]
        if missing:
            runs.append(
                StepRun(name, safe_version(step, settings), "skipped", 0.0,
                        error=f"needs {', '.join(missing)}, which did not produce a result")
            )
            continue
        started = time.perf_counter()
        try:
            result = step.run(ctx)
            version = step.version(settings)  # after run: a model step knows it once loaded
        except StepUnavailable as exc:
            runs.append(StepRun(name, safe_version(step, settings), "unavailable",
                                _ms_since(started), error=str(exc)))
            log.warning("step %s unavailable: %s", name, exc)
            continue
        except Exception as exc:  # one broken step must not lose the others' output
            if is_retryable_db_error(exc):
                # Steps have no database; one that reaches it anyway and hits an outage is not
                # broken: the whole analysis is retried (and logged as that by the caller).
                raise
            log.exception("step %s failed on image %s", name, ctx.image_id)
            runs.append(StepRun(name, safe_version(step, settings), "failed", _ms_since(started),
                                error=f"{type(exc).__name__}: {exc}"))
            continue
        ctx.results[name] = result
        runs.append(StepRun(name, version, "ok", _ms_since(started), result=result))
    metrics.steps_ran((run.step, run.version, run.status, run.duration_ms) for run in runs)
    return runs


def safe_version(step: Step, settings: Settings) -> str:
    """The step's version, or "unknown" when it cannot tell (e.g. its model is missing)."""
    try:
        return step.version(settings)
    except Exception:  # noqa: BLE001 - any failure here means the same: no version to record
        return "unknown"


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
