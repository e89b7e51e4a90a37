"""The in-process parts: ``models`` (each step's own model time per image) and ``overhead``
(CPU time per image outside the model forwards, with a profile of what is left).

Both run the worker's real path for one image — ``apply_event`` then ``analyze_image``:
claim, load and decode, every configured step, one store transaction — on real ~1 MP JPEGs,
with every model forward timed by :data:`bench.common.METER`. The first images of a run load
the models and are not timed.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import METER, Tally, install_meter, label_steps

#: Steps whose work is a model forward through the runtime (the others have none).
MODEL_STEPS = ("tagging", "detection", "segmentation", "superres", "contact_info", "nsfw")


@dataclass
class Run:
    """Per-image figures of one in-process run (timed images only)."""

    images: int = 0
    wall: list[float] = field(default_factory=list)  # s per image, whole analyze_image
    cpu: list[float] = field(default_factory=list)  # process CPU s per image
    forward_wall: list[float] = field(default_factory=list)
    forward_cpu: list[float] = field(default_factory=list)
    steps: dict[str, Tally] = field(default_factory=dict)  # step.run wall/CPU, summed
    step_forward: dict[str, Tally] = field(default_factory=dict)  # forwards inside each step
    phases: dict[str, Tally] = field(default_factory=dict)  # decode, claim, store (when found)
    engines: dict[str, str] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    profile: list[dict[str, Any]] = field(default_factory=list)


_PHASES = {"load_image": "load + decode", "claim_image": "claim", "_store": "store"}


def _wrap_phases(phases: dict[str, Tally]) -> list[tuple[Any, str, Any]]:
    """Time the analyze module's phase functions where they exist (restored afterwards)."""
    import worker.pipeline.analyze as analyze

    restore = []
    for attr, label in _PHASES.items():
        original = getattr(analyze, attr, None)
        if original is None or not callable(original):
            continue

        def timed(*args: Any, _f: Any = original, _label: str = label, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return _f(*args, **kwargs)
            finally:
                phases.setdefault(_label, Tally()).add(time.perf_counter() - wall, time.process_time() - cpu)

        setattr(analyze, attr, timed)
        restore.append((analyze, attr, original))
    return restore


def run_inprocess(photos: list[str], steps: list[str], url: str, data_dir: Path, *, threads: int | None,
                  device: str = "cpu", batch: int | None = None, warm: int = 2,
                  profile_images: int = 0) -> Run:
    """Analyse ``photos`` in this process; the first ``warm`` are not timed, the last
    ``profile_images`` run under cProfile (model forwards excluded from the profile)."""
    from db.migrate import upgrade
    from db.session import session_factory
    from worker.config import load_settings
    from worker.intake.events import parse_event
    from worker.pipeline.analyze import analyze_image
    from worker.pipeline.events import apply_event

    if url.startswith("sqlite"):
        upgrade(url)
    overrides: dict[str, Any] = {"data_dir": data_dir, "database_url": url, "steps": steps, "device": device,
                                 "fetch_allow_dirs": [str(Path(photos[0]).parent)]}
    if threads:
        overrides["torch_threads"] = threads
    if batch:
        overrides["batch_max_size"] = batch
    settings = load_settings(**overrides)
    install_meter()
    step_tallies = label_steps()
    factory = session_factory(url)
    ids: list[int] = []
    tag = uuid.uuid4().hex[:8]
    for n in range(0, len(photos), 4):
        event = parse_event({"event_id": str(uuid.uuid4()), "type": "listing.created",
                             "occurred_at": datetime.now(UTC).isoformat(),
                             "listing": {"id": f"bench-{tag}-{n}", "seller_id": f"s{n % 3}",
                                         "images": photos[n:n + 4]}})
        with factory() as s, s.begin():
            ids += apply_event(s, event).images_to_analyze
    run = Run()
    phases: dict[str, Tally] = {}
    restore = _wrap_phases(phases)
    profiler = cProfile.Profile() if profile_images else None
    timed_ids = ids[warm:]
    try:
        for image_id in ids[:warm]:
            with factory() as s:
                analyze_image(s, image_id, settings)
        step_tallies.clear()
        phases.clear()
        METER.reset()
        for index, image_id in enumerate(timed_ids):
            profiling = profiler is not None and index >= len(timed_ids) - profile_images
            if profiling and index == len(timed_ids) - profile_images:
                _snapshot(run, step_tallies, phases)  # before the (slower) profiled images
            before = METER.total.wall, METER.total.cpu
            if profiling:
                assert profiler is not None
                METER.profiler = profiler
                profiler.enable()
            wall, cpu = time.perf_counter(), time.process_time()
            with factory() as s:
                outcome = analyze_image(s, image_id, settings)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if profiling:
                assert profiler is not None
                profiler.disable()
                METER.profiler = None
                continue  # profiled images are slower: they feed the profile only
            run.images += 1
            run.wall.append(wall)
            run.cpu.append(cpu)
            run.forward_wall.append(METER.total.wall - before[0])
            run.forward_cpu.append(METER.total.cpu - before[1])
            key = outcome.status + (" (incomplete)" if outcome.detail.startswith("incomplete") else "")
            run.outcomes[key] = run.outcomes.get(key, 0) + 1
        if not run.steps:
            _snapshot(run, step_tallies, phases)
    finally:
        METER.profiler = None
        for module, attr, original in restore:
            setattr(module, attr, original)
    run.engines = _engines()
    if profiler is not None:
        run.profile = _top(profiler, max(1, min(profile_images, len(timed_ids))))
    return run


def _snapshot(run: Run, steps: dict[str, Tally], phases: dict[str, Tally]) -> None:
    copy = lambda tallies: {k: Tally(t.calls, t.wall, t.cpu) for k, t in tallies.items()}  # noqa: E731
    run.steps, run.step_forward, run.phases = copy(steps), copy(METER.by_label), copy(phases)


def _engines() -> dict[str, str]:
    """Loaded models and the backend each runs on."""
    from worker.models.runtime import VisionModel, _registry

    out = {}
    for value in list(_registry.values()):
        if isinstance(value, VisionModel) and value.loaded:
            out[value.name] = value.load().describe()
    return out


def _top(profiler: cProfile.Profile, images: int, n: int = 15) -> list[dict[str, Any]]:
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (filename, line, func), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = filename
        for marker in ("site-packages/", "/work/main/", "lib/python3"):
            if marker in where:
                where = where.split(marker, 1)[1]
        rows.append({"function": f"{where}:{line}({func})", "calls_per_image": round(calls / images, 1),
                     "tottime_ms": round(tottime * 1000 / images, 2), "cumtime_ms": round(cumtime * 1000 / images, 2)})
    rows.sort(key=lambda r: r["tottime_ms"], reverse=True)
    return rows[:n]


def ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 1) if values else float("nan")


def per_image(tally: Tally | None, images: int, attr: str = "wall") -> float:
    if tally is None or images == 0:
        return 0.0
    return round(getattr(tally, attr) * 1000 / images, 1)


# --------------------------------------------------------------------------- the parts


def models_part(ctx: Any) -> dict[str, Any]:
    """Each step's model time per image, at the worker's batch size, for the thread counts a
    worker process gets with 1 and 2 processes on this machine (cores / processes)."""
    import os

    from worker.models.runtime import batch_size

    cores = os.cpu_count() or 1
    photos = ctx.photos(ctx.n(quick=4, full=6) + 2)
    figures: list[dict[str, Any]] = []
    details: dict[str, Any] = {"photos": ctx.photo_desc, "steps": ctx.steps, "configs": {}}
    for procs in sorted({1, min(2, cores)}):
        threads = max(1, cores // procs)
        run = run_inprocess(photos, ctx.steps, f"sqlite:///{ctx.tmp / f'models-{threads}.db'}",
                            ctx.tmp / f"models-data-{threads}", threads=threads, warm=2)
        from worker.config import load_settings

        batch = batch_size(load_settings(device="cpu"))
        per_step = {}
        for step in ctx.steps:
            forward = run.step_forward.get(step)
            counted = run.steps.get(step)
            per_step[step] = {"model_ms": per_image(forward, run.images),
                              "model_cpu_ms": per_image(forward, run.images, "cpu"),
                              "step_ms": per_image(counted, run.images),
                              "forwards_per_image": round((forward.calls if forward else 0) / max(1, run.images), 2)}
        total = round(sum(v["model_ms"] for v in per_step.values()), 1)
        ceiling = round(procs * 1000 / total, 2) if total else None
        details["configs"][f"{procs}proc"] = {
            "processes": procs, "threads_per_process": threads, "batch": batch, "images": run.images,
            "per_step": per_step, "model_ms_per_image": total, "model_only_images_per_s": ceiling,
            "engines": run.engines,
        }
        for step, v in per_step.items():
            if step in MODEL_STEPS or v["model_ms"]:
                note = f"CPU {v['model_cpu_ms']} ms; {v['forwards_per_image']} forwards/img"
                if step == "superres" and not v["forwards_per_image"]:
                    note = "not run: superres only enhances photos with a short side < 512 px"
                figures.append({"name": f"model ms/img {step} ({threads} thr, batch {batch})", "value": v["model_ms"],
                                "unit": "ms", "note": note})
        cpu_total = sum(v["model_cpu_ms"] for v in per_step.values())
        figures.append({"name": f"model-only ceiling, {procs} process(es) x {threads} thr", "value": ceiling,
                        "unit": "img/s", "note": f"sum of model wall time {total} ms/img (CPU {cpu_total:.1f} ms)"})
    return {"figures": figures, "details": details}


def overhead_part(ctx: Any) -> dict[str, Any]:
    """Non-model CPU ms per image with every configured step on ~1 MP JPEGs, one intra-op
    thread (so no OpenMP spinning is counted outside the forwards), Postgres store."""
    from bench.common import postgres_available, scratch_database

    photos = ctx.photos(ctx.n(quick=6, full=12) + 2 + ctx.n(quick=2, full=3))
    profile_images = ctx.n(quick=2, full=3)
    why = postgres_available()
    if why is None:
        with scratch_database("catalog_bench_ovh") as url:
            run = run_inprocess(photos, ctx.steps, url, ctx.tmp / "ovh-data", threads=1, warm=2,
                                profile_images=profile_images)
        store = "Postgres"
    else:
        run = run_inprocess(photos, ctx.steps, f"sqlite:///{ctx.tmp / 'ovh.db'}", ctx.tmp / "ovh-data",
                            threads=1, warm=2, profile_images=profile_images)
        store = f"SQLite ({why})"
    seen = run.images
    non_model = [c - f for c, f in zip(run.cpu, run.forward_cpu, strict=True)]
    breakdown: dict[str, float] = {}
    for label, tally in sorted(run.phases.items()):
        breakdown[label] = per_image(tally, seen, "cpu")
    for step in ctx.steps:
        spent = per_image(run.steps.get(step), seen, "cpu")
        model = per_image(run.step_forward.get(step), seen, "cpu")
        breakdown[f"step {step} (non-model)"] = round(spent - model, 1)
    breakdown["other: transactions, claim/store glue, task code"] = round(
        statistics.mean(non_model) * 1000 - sum(breakdown.values()), 1)
    figures = [
        {"name": "non-model CPU ms/img, all steps, 1 MP", "value": ms(non_model), "unit": "ms", "target": "<= 16",
         "note": f"median of {run.images}; total CPU {ms(run.cpu)} ms, model {ms(run.forward_cpu)} ms; {store}"},
        {"name": "CPU ms/img inside model forwards", "value": ms(run.forward_cpu), "unit": "ms"},
        {"name": "wall ms/img, analyze_image (1 thread)", "value": ms(run.wall), "unit": "ms"},
    ]
    details = {"photos": ctx.photo_desc, "steps": ctx.steps, "store": store, "images": run.images,
               "non_model_cpu_ms": [round(v * 1000, 1) for v in non_model],
               "breakdown_cpu_ms_per_image": breakdown,
               "non_model_cpu_ms_mean": round(statistics.mean(non_model) * 1000, 1),
               "outcomes": run.outcomes, "engines": run.engines, "profile_top_non_model": run.profile}
    return {"figures": figures, "details": details}
