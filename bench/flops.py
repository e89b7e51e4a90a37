"""The arithmetic floor: FLOPs per image of each loaded model (``torch.utils.flop_counter``)
divided by this device's measured matmul peak, next to the measured forward time.

Torch modules are counted as they run. A model on onnxruntime is counted through its torch twin
(``onnx2torch`` of the same ``.onnx`` file); a library pipeline (PP-OCR through rapidocr) and a
model that no twin can be built for are listed as not counted, with the reason. FLOPs here are
``torch.utils.flop_counter``'s: 2 per multiply-accumulate of convolutions and matrix products;
element-wise work (activations, normalisation, resizing) is not counted, so the floor is a
lower bound.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None,
                repeats: int = 5) -> float:
    """Best measured FLOP/s of an ``n`` x ``n`` matrix product on ``device``."""
    n = n or (8192 if device.type == "cuda" else 1536)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def count_flops(module: torch.nn.Module, batch: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        module(batch)
    return int(counter.get_total_flops())


def torch_twin(model: Any, backend: Any) -> tuple[torch.nn.Module | None, str]:
    """The torch module that computes what ``backend`` computes, or None and why not."""
    from worker.models.backends import TorchBackend

    if isinstance(backend, TorchBackend):
        return backend.module, "torch"
    path = getattr(backend, "path", None)
    if path is not None and str(path).endswith(".onnx"):
        try:
            import onnx
            from onnx2torch import convert

            return convert(onnx.load(str(path))).eval(), "onnx2torch twin of " + type(backend).__name__
        except Exception as exc:  # noqa: BLE001 - a twin that cannot be built is reported, not fatal
            return None, f"no torch twin ({type(exc).__name__})"
    return None, f"{backend.describe()}: runs outside torch (not counted)"


def model_rows(device: torch.device, photo: Any, repeats: int = 3) -> list[dict[str, Any]]:
    """FLOPs and measured forward ms (batch 1) of every model loaded in this process on
    ``device``."""
    from worker.models.runtime import VisionModel, _registry

    rows: list[dict[str, Any]] = []
    seen = set()
    models = [v for v in list(_registry.values()) if isinstance(v, VisionModel)]
    # the instance with the most threads first (the registry may hold one per thread setting)
    for value in sorted(models, key=lambda m: -(m.torch_threads or 0)):
        if not value.loaded or value.device.type != device.type:
            continue
        if value.name in seen:
            continue
        seen.add(value.name)
        backend = value.load()
        try:
            item = value.prepare(photo)
        except Exception as exc:  # noqa: BLE001 - e.g. SR tiles: reported, not fatal
            rows.append({"model": value.name, "flops": None, "how": f"cannot prepare a photo: {exc}"})
            continue
        batch = value.collate([item.tensor])
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            backend.forward(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        module, how = torch_twin(value, backend)
        flops = None
        if module is not None:
            try:
                x = batch.to(device) if isinstance(batch, torch.Tensor) and how == "torch" else batch
                flops = count_flops(module, x)
            except Exception as exc:  # noqa: BLE001 - reported, not fatal
                how += f"; counting failed ({type(exc).__name__}: {str(exc)[:80]})"
        rows.append({"model": value.name, "engine": backend.describe(), "flops": flops, "how": how,
                     "measured_ms": round(statistics.median(times) * 1000, 2)})
    return rows


def flops_part(ctx: Any, device_name: str = "cpu") -> dict[str, Any]:
    from PIL import Image

    device = torch.device(device_name)
    if not ctx.models_loaded(device_name):
        ctx.load_models(device_name)
    with Image.open(ctx.photos(1)[0]) as img:
        photo = img.convert("RGB")
    if device.type == "cpu":
        import os

        torch.set_num_threads(os.cpu_count() or 1)
    threads = torch.get_num_threads()
    peak = matmul_peak(device)
    peaks = {"fp32": peak}
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        peaks["fp32"] = peak = matmul_peak(device)
        peaks["bf16"] = matmul_peak(device, torch.bfloat16)
    rows = model_rows(device, photo)
    figures = [{"name": f"matmul peak fp32 ({device_name}, {threads} thr)", "value": round(peak / 1e9, 1),
                "unit": "GFLOP/s"}]
    if "bf16" in peaks:
        figures.append({"name": "matmul peak bf16", "value": round(peaks["bf16"] / 1e9, 1), "unit": "GFLOP/s"})
    total_flops = 0
    total_ms = 0.0
    for row in rows:
        if row["flops"]:
            row["gflops"] = round(row["flops"] / 1e9, 3)
            row["floor_ms"] = round(row["flops"] / peak * 1000, 2)
            total_flops += row["flops"]
            total_ms += row["measured_ms"]
            figures.append({"name": f"floor vs measured, {row['model']}", "value":
                            f"{row['floor_ms']} / {row['measured_ms']}", "unit": "ms",
                            "note": f"{row['gflops']} GFLOP ({row['how']}; runs on {row['engine']})"})
        else:
            figures.append({"name": f"floor, {row['model']}", "value": "not counted", "unit": "",
                            "note": f"{row['how']}; measured {row.get('measured_ms')} ms"})
    if total_flops:
        floor = total_flops / peak * 1000
        figures.append({"name": "counted models: floor / measured per image", "value":
                        f"{floor:.1f} / {total_ms:.1f}", "unit": "ms",
                        "note": f"{total_flops / 1e9:.2f} GFLOP; measured is {total_ms / floor:.1f}x the floor"})
    return {"figures": figures, "details": {"device": device_name, "threads": threads,
                                            "peaks_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()},
                                            "models": rows}}
