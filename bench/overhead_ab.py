"""The worker's own CPU time per image, outside the model forwards (issue 14's <= 16 ms target).

    python -m bench.overhead_ab                          # this tree, ~1-2 min on 2 cores
    python -m bench.overhead_ab --images 8 --json after.json
    python -m bench.overhead_ab --tree /tmp/before       # the same measurement on another checkout
    python -m bench.overhead_ab --compare before.json after.json

On 1 MP JPEGs made from scikit-image's photos (distinct bytes each), with one intra-op
thread (so CPU time and wall time agree), for every configured step (default: all of them)
it times ``load`` (sha256 + decode, from bytes already in memory) and each step's ``run``
(by default in CPU time of the thread that runs them: with one intra-op thread every forward
runs on that thread too, and CPU time is far less inflated by a loaded machine than wall
time; ``--clock wall`` for wall time), and subtracts the time spent inside model forwards:
torch modules and onnxruntime sessions (rapidocr's sessions too, so its pre- and
post-processing count as overhead, as they are).
What is left is the worker's own work: decoding, resizing and colour conversion, hashes,
error-level analysis, k-means, OCR post-processing, thumbnails and cutouts.

The printed table has one row per step: total ms, model ms, non-model ms (medians per image),
and the sum. ``--tree`` re-runs this script with another checkout first on ``sys.path`` (e.g.
a ``git worktree`` of the commit before a change), so before and after are measured by the
same code on the same photos. Figures carry the load average they were measured under.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SIDE_PIXELS = 1_000_000
PHOTOS = ("coffee", "astronaut", "chelsea", "rocket")


def one_mp_jpegs(count: int) -> list[bytes]:
    """``count`` JPEGs (quality 90) of about 1 MP, from scikit-image's photos, distinct bytes."""
    from PIL import Image
    from skimage import data

    out = []
    for i in range(count):
        base = Image.fromarray(getattr(data, PHOTOS[i % len(PHOTOS)])()).convert("RGB")
        scale = (SIDE_PIXELS / (base.width * base.height)) ** 0.5
        img = base.resize((round(base.width * scale), round(base.height * scale)), Image.Resampling.BICUBIC)
        img = img.crop((i % 7, i % 5, img.width - (i % 3), img.height))  # distinct bytes per photo
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class ForwardClock:
    """Time spent inside model forwards, per thread (steps call them synchronously), read from
    ``now`` (the calling thread's CPU time by default)."""

    def __init__(self, now: Callable[[], float] = time.thread_time) -> None:
        self._local = threading.local()
        self.now = now

    @property
    def seconds(self) -> float:
        return float(getattr(self._local, "seconds", 0.0))

    def wrap(self, owner: Any, name: str) -> None:
        original = getattr(owner, name)
        clock = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = clock.now()
            try:
                return original(*args, **kwargs)
            finally:
                clock._local.seconds = clock.seconds + clock.now() - started

        setattr(owner, name, timed)


def install_clock(now: Callable[[], float] = time.thread_time) -> ForwardClock:
    clock = ForwardClock(now)
    from worker.models import backends

    clock.wrap(backends.TorchBackend, "forward")
    clock.wrap(backends.OnnxBackend, "forward")
    try:  # PP-OCR: only its three sessions are the model; rapidocr's own code is overhead
        from rapidocr_onnxruntime.utils import infer_engine

        clock.wrap(infer_engine.OrtInferSession, "__call__")
    except ImportError:
        pass
    return clock


@contextmanager
def _quiet() -> Iterator[None]:
    import logging

    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def measure(images: int = 8, steps: Sequence[str] | None = None, repeat: int = 1,
            clock_name: str = "cpu") -> dict[str, Any]:
    """Per-step total / model / non-model ms per image on 1 MP JPEGs (this process's tree).
    ``clock_name``: ``cpu`` (this thread's CPU time: with one intra-op thread every forward
    runs on it, and a loaded machine inflates it far less than wall time) or ``wall``."""
    os.environ.setdefault("CATALOG_TORCH_THREADS", "1")
    import hashlib

    import torch

    torch.set_num_threads(1)
    from worker.config import load_settings
    from worker.io.decode import decode_image
    from worker.pipeline import registry
    from worker.pipeline.contract import ImageContext, StepUnavailable
    from worker.pipeline.registry import get_step

    if hasattr(registry, "limit_blas_threads"):  # as the worker runs its steps (older trees: not)
        registry.limit_blas_threads()

    workdir = Path(tempfile.mkdtemp(prefix="overhead-ab-"))
    settings = load_settings(data_dir=workdir, device="cpu", torch_threads=1, batch_max_size=1,
                             **({"steps": list(steps)} if steps else {}))
    names = list(settings.steps)
    now = time.thread_time if clock_name == "cpu" else time.perf_counter
    clock = install_clock(now)
    photos = one_mp_jpegs(images)
    totals: dict[str, list[float]] = defaultdict(list)
    models: dict[str, list[float]] = defaultdict(list)
    status: dict[str, str] = {}
    with _quiet():
        for round_ in range(repeat + 1):  # round 0 loads the models (not counted)
            for index, raw in enumerate(photos):
                started = now()
                digest = hashlib.sha256(raw).hexdigest()
                image, fmt = decode_image(raw, settings)
                load_ms = (now() - started) * 1000
                ctx = ImageContext(image_id=index + 1, listing_id=1, seller_id="s", category="kitchenware",
                                   url=f"bench://{index}", image=image, raw=raw, source_format=fmt,
                                   sha256=digest, settings=settings)
                if round_:
                    totals["load"].append(load_ms)
                    models["load"].append(0.0)
                for name in names:
                    step = get_step(name)
                    if any(req not in ctx.results for req in step.requires):
                        status[name] = "skipped"
                        continue
                    before, started = clock.seconds, now()
                    try:
                        ctx.results[name] = step.run(ctx)
                        status.setdefault(name, "ok")
                    except StepUnavailable as exc:
                        status[name] = f"unavailable: {exc}"
                        continue
                    except Exception as exc:  # noqa: BLE001 - a broken step is reported, not fatal
                        status[name] = f"failed: {type(exc).__name__}: {exc}"
                        continue
                    if round_:
                        totals[name].append((now() - started) * 1000)
                        models[name].append((clock.seconds - before) * 1000)
    rows: list[dict[str, Any]] = []
    for name in ["load", *names]:
        if not totals.get(name):
            rows.append({"step": name, "status": status.get(name, "not run")})
            continue
        total, model = statistics.median(totals[name]), statistics.median(models[name])
        non_model = statistics.median(t - m for t, m in zip(totals[name], models[name], strict=True))
        rows.append({"step": name, "status": status.get(name, "ok"), "total_ms": round(total, 2),
                     "model_ms": round(model, 2), "non_model_ms": round(non_model, 2)})
    timed = [r for r in rows if "total_ms" in r]
    return {
        "what": "non-model ms per 1 MP JPEG, per step (1 intra-op thread)", "clock": clock_name,
        "tree": str(Path(sys.modules["worker"].__file__ or ".").resolve().parents[1]),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_1min": round(os.getloadavg()[0], 2), "images": images, "repeat": repeat,
        "rows": rows,
        "sum": {k: round(sum(r[k] for r in timed), 2) for k in ("total_ms", "model_ms", "non_model_ms")},
    }


def table(result: dict[str, Any], out: Callable[[str], None] = print) -> None:
    out(f"{'step':<14}{'total ms':>10}{'model ms':>10}{'non-model':>11}   status")
    for row in result["rows"]:
        if "total_ms" in row:
            out(f"{row['step']:<14}{row['total_ms']:>10.2f}{row['model_ms']:>10.2f}{row['non_model_ms']:>11.2f}"
                f"   {row['status']}")
        else:
            out(f"{row['step']:<14}{'':>31}   {row['status'][:100]}")
    total = result["sum"]
    out(f"{'sum':<14}{total['total_ms']:>10.2f}{total['model_ms']:>10.2f}{total['non_model_ms']:>11.2f}"
        f"   (load average {result['load_1min']}, {result['images']} photos, {result['tree']})")


def compare(before: dict[str, Any], after: dict[str, Any], out: Callable[[str], None] = print) -> None:
    b = {r["step"]: r for r in before["rows"] if "non_model_ms" in r}
    a = {r["step"]: r for r in after["rows"] if "non_model_ms" in r}
    out(f"{'step':<14}{'before':>10}{'after':>10}{'change':>10}   (non-model ms per image)")
    for step in [*b, *(s for s in a if s not in b)]:
        x, y = b.get(step, {}).get("non_model_ms"), a.get(step, {}).get("non_model_ms")
        change = f"{(y - x):+.2f}" if x is not None and y is not None else ""
        out(f"{step:<14}{x if x is not None else '':>10}{y if y is not None else '':>10}{change:>10}")
    out(f"{'sum':<14}{before['sum']['non_model_ms']:>10}{after['sum']['non_model_ms']:>10}"
        f"{after['sum']['non_model_ms'] - before['sum']['non_model_ms']:>+10.2f}   "
        f"(load {before['load_1min']} / {after['load_1min']})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="1 MP photos (default 8)")
    parser.add_argument("--repeat", type=int, default=1, help="timed passes after the warm-up pass (default 1)")
    parser.add_argument("--steps", help="comma-separated steps (default: CATALOG_STEPS, i.e. all)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: the thread's CPU time (default; robust on a loaded machine); wall")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--tree", type=Path, help="measure this checkout instead (e.g. a git worktree)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"),
                        help="print the per-step difference of two JSON results and exit")
    args = parser.parse_args(argv)
    if args.compare:
        compare(*(json.loads(p.read_text()) for p in args.compare))
        return 0
    if args.tree:
        forwarded = list(argv if argv is not None else sys.argv[1:])
        i = forwarded.index("--tree")
        del forwarded[i:i + 2]
        env = {**os.environ, "PYTHONPATH": f"{args.tree.resolve()}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        script = Path(__file__).resolve()
        return subprocess.call([sys.executable, str(script), *forwarded], env=env, cwd=args.tree)
    steps = [s.strip() for s in args.steps.split(",")] if args.steps else None
    result = measure(args.images, steps, args.repeat, args.clock)
    table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
