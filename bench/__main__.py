"""One benchmark entry point: ``python -m bench [PART ...]``.

    python -m bench                                   # every part, CPU (< 10 min on 2 cores)
    python -m bench --quick                           # smaller counts (~4-5 min)
    python -m bench e2e latency                       # some parts only
    python -m bench --out bench-results.json --plots docs/img/
    python -m bench --from-json bench-results.json --plots docs/img/   # redraw, measure nothing
    python -m bench gpu --out gpu.json                # GPU parts (bench/gpu.sh runs this)

Parts (each runnable alone):

  models    each configured step's model time per image (forwards only), at the worker's batch
            size, with the threads a worker process gets with 1 and with 2 processes; the
            model-only ceiling (images/s) is the sum of the steps' model times
  overhead  non-model CPU ms per image, all steps, ~1 MP JPEGs: process CPU time minus the
            CPU time inside model forwards, split into decode, each step, claim/store, and a
            cProfile of the rest (forwards excluded)
  e2e       Redis stream -> catalog ingest -> Celery workers -> Postgres, 1 and 2 worker
            processes: metadata-only (images/s per process) and all steps (throughput, and
            its ratio to the model-only ceiling of the models part in the same run)
  latency   XADD -> listing committed p50/p95/p99 at ~60 % of the saturation throughput
            measured first in the same run (metadata step)
  memory    worker RSS at start, after 500 and after 1,000 listings (metadata step)
  flops     FLOPs per image of each model / the measured matmul peak = the arithmetic floor,
            next to the measured forward time
  backends  bench/backends.py (onnxruntime vs onnx2torch side by side), when it exists
  gpu       on CUDA: models at batch 8 and 32, flops, end to end with a threads pool; on a
            machine without a GPU: "no GPU: not measured" (--gpu-dry-run runs its code on CPU)

Needs the local Postgres (BENCH_PG_DSN / BENCH_PG_URL) and Redis (BENCH_REDIS_URL, default
database 12, flushed before and after: the broker's keys have fixed names) for overhead's
store, e2e, latency and memory. Every figure is printed with the machine, the date and the
1-minute load average at the start and end of its part; the load matters on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

PARTS = ("models", "overhead", "e2e", "latency", "memory", "flops", "backends", "gpu")
SERVER_PARTS = {"e2e", "latency", "memory"}
#: perf-runtime's side-by-side backends bench (the ``backends`` part runs it when present)
BACKENDS_SCRIPT = Path(__file__).with_name("backends.py")


class Context:
    """What a part gets: options, scratch folder, photos, results of parts already run."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.quick = args.quick
        self.tmp = tmp
        self.results: dict[str, dict[str, Any]] = {}
        self._photos: list[str] = []
        self.photo_desc = ""
        if args.steps:
            self.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
        else:
            from worker.config import DEFAULT_STEPS

            self.steps = list(DEFAULT_STEPS)

    def n(self, quick: int, full: int) -> int:
        if self.args.smoke:
            return min(quick, 2)
        return quick if self.quick else full

    def photos(self, n: int) -> list[str]:
        """``n`` ~1 MP JPEG files (the same files for every part; more are written on demand)."""
        if len(self._photos) < n:
            from bench.common import photo_sizes, write_photos

            self._photos = write_photos(self.tmp / "photos", max(n, len(self._photos)), self.args.megapixels)
            self.photo_desc = photo_sizes(self._photos)
        return self._photos[:n]

    def model_only(self, procs: int) -> float | None:
        """The model-only ceiling (images/s) for ``procs`` processes from this run's models part."""
        configs = self.results.get("models", {}).get("details", {}).get("configs", {})
        value = configs.get(f"{procs}proc", {}).get("model_only_images_per_s")
        return float(value) if value else None

    def models_loaded(self, device: str) -> bool:
        from worker.models.runtime import VisionModel, _registry

        return any(isinstance(v, VisionModel) and v.loaded and v.device.type == device for v in _registry.values())

    def load_models(self, device: str) -> None:
        """Run every configured step on two photos (loads the models, times nothing)."""
        from bench.inprocess import run_inprocess

        run_inprocess(self.photos(2), self.steps, f"sqlite:///{self.tmp / f'load-{device}.db'}",
                      self.tmp / f"load-{device}", threads=os.cpu_count() if device == "cpu" else None,
                      device=device, warm=2)

    def log(self, message: str) -> None:
        if self.args.verbose:
            print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- parts


def backends_part(ctx: Context) -> dict[str, Any]:
    """perf-runtime's side-by-side backends bench, when it exists."""
    import subprocess

    if not BACKENDS_SCRIPT.is_file():
        return {"status": "not available", "reason": "bench/backends.py (onnxruntime vs onnx2torch side by side) "
                "is not in this checkout"}
    out = ctx.tmp / "backends.json"
    help_text = subprocess.run([sys.executable, "-m", "bench.backends", "--help"], capture_output=True, text=True,
                               timeout=120).stdout
    cmd = [sys.executable, "-m", "bench.backends"]
    if "--json" in help_text:
        cmd += ["--json", str(out)]
    if "--repeat" in help_text:  # its default (3 passes) alone would take a third of the 10 minutes
        cmd += ["--repeat", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=ctx.n(quick=240, full=360))
    details: dict[str, Any] = {"command": " ".join(cmd[1:]), "returncode": proc.returncode,
                               "output": proc.stdout[-6000:], "stderr_tail": proc.stderr[-2000:]}
    if out.is_file():
        details["json"] = json.loads(out.read_text())
    if proc.returncode != 0:
        return {"status": "failed", "reason": f"bench.backends exited with {proc.returncode}", "details": details}
    print(proc.stdout)
    return {"figures": [{"name": "onnxruntime vs onnx2torch side by side", "value": "see output", "unit": "",
                         "note": "printed above and stored under details"}], "details": details}


def gpu_part(ctx: Context) -> dict[str, Any]:
    """Models at batch 8 and 32, flops and end to end, on CUDA."""
    import torch

    dry = ctx.args.gpu_dry_run
    if not dry and not torch.cuda.is_available():
        return {"status": "not available", "reason": "no GPU: not measured"}
    device = "cpu" if dry else "cuda"
    batches = (2, 4) if dry else (8, 32)
    figures: list[dict[str, Any]] = []
    details: dict[str, Any] = {"device": device, "dry_run": dry, "batches": batches, "models": {}, "e2e": {}}
    from bench.common import METER, install_meter

    install_meter()
    ctx.load_models(device)
    from PIL import Image

    from worker.models.runtime import VisionModel, _registry

    images = []
    for path in ctx.photos(max(batches)):
        with Image.open(path) as img:
            images.append(img.convert("RGB"))
    for model in [v for v in list(_registry.values()) if isinstance(v, VisionModel) and v.loaded
                  and v.device.type == device and v.name not in details["models"]]:
        row: dict[str, Any] = {"engine": model.load().describe()}
        for b in batches:
            batch = (images * (b // len(images) + 1))[:b]
            try:
                model.predict_batch(batch)  # warm this batch shape
                METER.reset()
                start = time.perf_counter()
                repeats = 1 if dry else 3
                for _ in range(repeats):
                    model.predict_batch(batch)
                if device == "cuda":
                    torch.cuda.synchronize()
                wall = (time.perf_counter() - start) / (repeats * b)
                row[f"b{b}_ms_per_image"] = round(wall * 1000, 2)
                row[f"b{b}_model_ms_per_image"] = round(METER.total.wall * 1000 / (repeats * b), 2)
            except Exception as exc:  # noqa: BLE001 - one model failing must not hide the others
                row[f"b{b}_error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        details["models"][model.name] = row
        for b in batches:
            figures.append({"name": f"GPU {model.name} batch {b}", "value": row.get(f"b{b}_ms_per_image",
                            row.get(f"b{b}_error")), "unit": "ms/img",
                            "note": f"forward only {row.get(f'b{b}_model_ms_per_image')} ms/img; {row['engine']}"})
    from bench.flops import flops_part

    fl = flops_part(ctx, device)
    figures += [dict(f, name="GPU " + f["name"]) for f in fl["figures"]]
    details["flops"] = fl["details"]
    if ctx.args.no_servers:
        details["e2e"] = "skipped (--no-servers)"
    else:
        from bench.e2e import burst, cluster

        count = ctx.n(quick=4, full=4) if dry else ctx.n(quick=64, full=160)
        photos = ctx.photos(64)
        for b in batches:
            with cluster(photos, ctx.steps, b, device=device, pool="threads", batch=b, log_dir=ctx.tmp) as c:
                res = burst(c, count, 4)
            details["e2e"][f"b{b}"] = res
            forward = res["worker_forward_wall_ms_per_image"]
            figures.append({"name": f"GPU e2e all steps, threads pool x{b}, batch {b}", "value": res["images_per_s"],
                            "unit": "img/s", "note": f"{count} images; forwards {forward} ms/img (wall, summed "
                            "over threads)"})
    return {"figures": figures, "details": details}


def _registry_of_parts() -> dict[str, Callable[[Context], dict[str, Any]]]:
    from bench.e2e import e2e_part, latency_part, memory_part
    from bench.flops import flops_part
    from bench.inprocess import models_part, overhead_part

    return {"models": models_part, "overhead": overhead_part, "e2e": e2e_part, "latency": latency_part,
            "memory": memory_part, "flops": flops_part, "backends": backends_part, "gpu": gpu_part}


def run_part(name: str, fn: Callable[[Context], dict[str, Any]], ctx: Context) -> dict[str, Any]:
    from bench.common import load1, postgres_available, redis_available

    started, load_start = time.perf_counter(), load1()
    print(f"== {name} (load {load_start}) ...", file=sys.stderr, flush=True)
    result: dict[str, Any]
    if name in SERVER_PARTS and ctx.args.no_servers:
        result = {"status": "not available", "reason": "--no-servers"}
    elif name in SERVER_PARTS and (why := postgres_available() or redis_available()):
        result = {"status": "not available", "reason": why}
    else:
        try:
            result = fn(ctx)
            result.setdefault("status", "ok")
        except Exception as exc:  # noqa: BLE001 - one part failing must not lose the others' figures
            traceback.print_exc()
            result = {"status": "failed", "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
    result["load_start"], result["load_end"] = load_start, load1()
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(f"== {name}: {result['status']} in {result['seconds']} s (load {load_start} -> {result['load_end']})",
          file=sys.stderr, flush=True)
    return result


# --------------------------------------------------------------------------- output


def table(report: dict[str, Any]) -> str:
    from bench.common import machine_line

    lines = [f"# catalog-worker bench: {machine_line(report['machine'])}",
             f"# photos: {report.get('photos', '')}; steps: {','.join(report.get('steps', []))}; "
             f"{'quick' if report.get('quick') else 'full'} run, {report.get('seconds')} s",
             "", "| part | figure | value | unit | target | notes | load 1-min start -> end |",
             "|---|---|---|---|---|---|---|"]
    for name, part in report["parts"].items():
        load = f"{part.get('load_start')} -> {part.get('load_end')}"
        if part.get("status") != "ok":
            lines.append(f"| {name} | {part.get('status')} | – | | | {part.get('reason', '')} | {load} |")
            continue
        for fig in part.get("figures", []):
            lines.append(f"| {name} | {fig['name']} | {fig['value']} | {fig.get('unit', '')} | "
                         f"{fig.get('target', '')} | {fig.get('note', '')} | {load} |")
    overhead = report["parts"].get("overhead", {})
    if overhead.get("status") == "ok":
        d = overhead["details"]
        lines += ["", "Non-model CPU ms per image, by part (overhead; mean of the timed images):"]
        lines += [f"  {k:55} {v:8.1f}" for k, v in d["breakdown_cpu_ms_per_image"].items()]
        lines += ["", "Top non-model functions by own time (cProfile, forwards excluded; ms per image):"]
        lines += [f"  {r['tottime_ms']:8.2f} ms  {r['calls_per_image']:>8} calls  {r['function']}"
                  for r in d["profile_top_non_model"]]
    return "\n".join(lines)


def write_plots(report: dict[str, Any], folder: Path) -> list[Path]:
    from bench.plots import latency_png, throughput_png

    subtitle = f"{report['machine']['host_cores']} cores, {report['machine']['date']}"
    written = []
    e2e = report["parts"].get("e2e", {})
    if e2e.get("status") == "ok":
        e2e["details"]["model_only"] = {str(p): _ceiling(report, p) for p in (1, 2)}
        load = f"load {e2e['load_start']}->{e2e['load_end']}"
        written.append(throughput_png(folder / "bench-throughput.png", e2e, f"{subtitle}, {load}"))
    latency = report["parts"].get("latency", {})
    if latency.get("status") == "ok":
        load = f"load {latency['load_start']}->{latency['load_end']}"
        written.append(latency_png(folder / "bench-latency.png", latency, f"{subtitle}, {load}"))
    return written


def _ceiling(report: dict[str, Any], procs: int) -> float | None:
    configs = report["parts"].get("models", {}).get("details", {}).get("configs", {})
    value = configs.get(f"{procs}proc", {}).get("model_only_images_per_s")
    return float(value) if value else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", metavar="PART", help=f"parts to run (default: all): {', '.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="smaller counts (figures are noisier)")
    parser.add_argument("--out", type=Path, help="write every figure as JSON here")
    parser.add_argument("--table", type=Path, help="also write the printed table here")
    parser.add_argument("--plots", type=Path, metavar="DIR", help="write bench-throughput.png and bench-latency.png")
    parser.add_argument("--from-json", type=Path, nargs="+", metavar="JSON", help="print the table and draw the "
                        "plots of earlier --out files (parts of later files win); measures nothing")
    parser.add_argument("--steps", help="steps for the all-steps figures (default: CATALOG_STEPS' default, all)")
    parser.add_argument("--megapixels", type=float, default=1.0, help="photo size (default 1.0 MP)")
    parser.add_argument("--no-servers", action="store_true", help="skip the parts that need Postgres and Redis")
    parser.add_argument("--gpu-dry-run", action="store_true", help="run the gpu part's code on the CPU with tiny "
                        "counts (checks bench/gpu.sh on a machine without a GPU)")
    parser.add_argument("--smoke", action="store_true", help="tiny counts: checks that the code runs; the "
                        "figures mean nothing (tests/test_bench.py)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; parts: {', '.join(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # `timeout` and Ctrl-C end the run through the finally blocks: worker processes stopped,
    # scratch databases dropped, the bench's Redis database flushed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = merged(args.from_json) if args.from_json else measure(args)
    text = table(report)
    print(text)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(text + "\n")
    if args.out and not args.from_json:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))
        print(f"\nJSON: {args.out}")
    if args.plots:
        for path in write_plots(report, args.plots):
            print(f"plot: {path}")
    failed = [n for n, p in report["parts"].items() if p.get("status") == "failed"]
    return 1 if failed else 0


def merged(paths: list[Path]) -> dict[str, Any]:
    """One report from several --out files: the first one's machine, every file's parts."""
    reports = [json.loads(path.read_text()) for path in paths]
    report = dict(reports[0], parts={})
    for other in reports:
        report["parts"].update(other["parts"])
    return report


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    from bench.common import machine

    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="catalog-bench-"))
    try:
        ctx = Context(args, tmp)
        parts = _registry_of_parts()
        wanted = args.parts or list(PARTS)
        report: dict[str, Any] = {"machine": machine(), "quick": args.quick, "steps": ctx.steps, "parts": {}}
        for name in wanted:
            report["parts"][name] = ctx.results[name] = run_part(name, parts[name], ctx)
            report["photos"] = ctx.photo_desc
            if args.out:  # after every part: a run cut short keeps what it measured
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(report, indent=2, default=str))
        report["seconds"] = round(time.perf_counter() - started, 1)
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
