"""Vision-model throughput: ms/image at batch 1 and batch N, and what dynamic batching buys.

    python -m bench.vision                      # CPU, a few repeats (~2-4 min on 2 cores)
    python -m bench.vision --device cuda        # one GPU, more repeats (< 5 min)
    python -m bench.vision --models detection --threads 8 --json out.json

For each model (tagging = EfficientNet-Lite0, detection = YOLOv3-tiny, segmentation =
U²-Netp, all on torch; ``--models nsfw`` adds open_nsfw on onnxruntime) it measures, on real
photos of different sizes, in the same run:

* ``b1``: the direct path, one image per forward, sequentially (ms/image);
* ``bN``: one forward over N images (ms/image);
* ``direct xT``: T threads each running the direct path concurrently (the baseline: what
  a threads-pool worker does without the batcher);
* ``batched xT``: the same T threads submitting to the model's dynamic batcher
  (``batch_max_size`` N, ``batch_timeout_ms``); speed-up = direct time / batched time.

Pre- and post-processing are included everywhere, as a step sees them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from worker.models.runtime import VisionModel, resolve_device


def photos() -> list[Image.Image]:
    """Eight real photos of different sizes (from wheels and the darknet package)."""
    from skimage import data

    base = [data.coffee(), data.chelsea(), data.astronaut(), data.rocket()]
    images = [Image.fromarray(array) for array in base]
    dog = Path("/usr/share/darknet/data/dog.jpg")
    if dog.is_file():
        images.append(Image.open(dog).convert("RGB"))
    sizes = [(640, 480), (300, 451), (1024, 768), (777, 333)]
    while len(images) < 8:
        source = images[len(images) % len(base)]
        images.append(source.resize(sizes[len(images) % len(sizes)]))
    return images[:8]


def build(name: str, device: str, batch: int, timeout_ms: float) -> VisionModel[Any]:
    kwargs: dict[str, Any] = {"device": device, "batch_max_size": batch, "batch_timeout_ms": timeout_ms}
    if name == "tagging":
        from worker.steps.tagging import EfficientNetLite0

        return EfficientNetLite0(**kwargs)
    if name == "detection":
        from worker.steps.detection import YoloV3Tiny

        return YoloV3Tiny(**kwargs)
    if name == "segmentation":
        from worker.steps.segmentation import U2Netp

        return U2Netp(**kwargs)
    if name == "nsfw":  # onnxruntime behind the same runtime
        from worker.fraud.nsfw import OpenNsfw

        return OpenNsfw(**kwargs)
    raise SystemExit(f"unknown model {name!r}")


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median (wall seconds, process CPU seconds) of ``repeats`` calls.

    CPU seconds matter on a shared machine: there, a process with more runnable threads gets
    a larger share of the cores, which flatters wall-clock figures of many-thread runs.
    """
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def bench_model(name: str, args: argparse.Namespace, images: list[Image.Image]) -> dict[str, Any]:
    model = build(name, args.device, args.batch, args.timeout_ms)
    started = time.perf_counter()
    model.load()
    load_s = time.perf_counter() - started
    batch = (images * ((args.batch + len(images) - 1) // len(images)))[: args.batch]
    model.predict_batch(batch)  # warm the batch shape too

    b1, b1_cpu = (t / len(images) for t in timed(lambda: [model.predict(image) for image in images], args.repeats))
    bn, bn_cpu = (t / len(batch) for t in timed(lambda: model.predict_batch(batch), args.repeats))

    work = [images[i % len(images)] for i in range(args.threads * args.per_thread)]
    chunks = [work[t::args.threads] for t in range(args.threads)]

    def concurrent(call: Callable[[Image.Image], object]) -> None:
        with ThreadPoolExecutor(args.threads) as pool:
            list(pool.map(lambda chunk: [call(image) for image in chunk], chunks))

    direct, direct_cpu = timed(lambda: concurrent(model.predict), args.repeats)
    batcher = model._get_batcher()
    batcher.batch_sizes.clear()
    batched, batched_cpu = timed(lambda: concurrent(model.infer), args.repeats)
    sizes = list(batcher.batch_sizes)
    model.close()
    return {
        "model": name,
        "version": model.version,
        "device": str(model.device),
        "engine": model.load().describe(),
        "load_s": round(load_s, 2),
        "b1_ms": round(b1 * 1000, 1),
        f"b{args.batch}_ms": round(bn * 1000, 1),
        "direct_threads_ms": round(direct * 1000 / len(work), 1),
        "batched_threads_ms": round(batched * 1000 / len(work), 1),
        "speedup": round(direct / batched, 2),
        "cpu_ms": {"b1": round(b1_cpu * 1000, 1), f"b{args.batch}": round(bn_cpu * 1000, 1),
                   "direct_threads": round(direct_cpu * 1000 / len(work), 1),
                   "batched_threads": round(batched_cpu * 1000 / len(work), 1)},
        "mean_batch": round(sum(sizes) / max(1, len(sizes)), 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--models", default="tagging,detection,segmentation")
    parser.add_argument("--batch", type=int, default=8, help="batch size N (and batcher max size)")
    parser.add_argument("--timeout-ms", type=float, default=10.0, help="batcher timeout")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--per-thread", type=int, default=None, help="images per thread (default 1 CPU, 8 GPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 2 CPU, 10 GPU)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); 1 on a shared/oversubscribed CPU")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    gpu = resolve_device(args.device).type == "cuda"
    args.device = "cuda" if gpu else "cpu"
    args.per_thread = args.per_thread or (8 if gpu else 1)
    args.repeats = args.repeats or (10 if gpu else 2)

    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    images = photos()
    rows = [bench_model(name.strip(), args, images) for name in args.models.split(",") if name.strip()]
    where = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"# vision bench on {where}; {args.threads} threads x {args.per_thread} images; "
          f"batcher max {args.batch}, timeout {args.timeout_ms} ms; median of {args.repeats}")
    header = ["model", "b1 ms/img", f"b{args.batch} ms/img", f"direct x{args.threads} ms/img",
              f"batched x{args.threads} ms/img", "speed-up", "mean batch", "version"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print(f"| {row['model']} | {row['b1_ms']} | {row[f'b{args.batch}_ms']} | {row['direct_threads_ms']} | "
              f"{row['batched_threads_ms']} | {row['speedup']}x | {row['mean_batch']} | {row['version']} |")
    if not gpu:
        print("\nCPU time per image (ms; less sensitive to other load on a shared machine):")
        print(f"| model | b1 | b{args.batch} | direct x{args.threads} | batched x{args.threads} | speed-up |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            cpu = row["cpu_ms"]
            print(f"| {row['model']} | {cpu['b1']} | {cpu[f'b{args.batch}']} | {cpu['direct_threads']} | "
                  f"{cpu['batched_threads']} | {round(cpu['direct_threads'] / cpu['batched_threads'], 2)}x |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
