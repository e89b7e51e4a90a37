"""Smoke tests of ``python -m bench``: each part's code runs on a tiny input and produces the
figures it promises. Correctness only: no figure is compared with a speed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from bench import __main__ as bench_main
from bench import common
from bench.common import METER, ForwardMeter, Tally, install_meter, pct, write_photos
from bench.flops import count_flops, matmul_peak
from bench.plots import latency_png, throughput_png
from tests.support.services import REDIS_URL


def _ctx(tmp_path: Path, *argv: str) -> bench_main.Context:
    args = bench_main.parse_args(["--smoke", "--steps", "metadata,tagging,quality", *argv])
    return bench_main.Context(args, tmp_path)


def test_photos_are_distinct_one_megapixel_jpegs(tmp_path: Path) -> None:
    paths = write_photos(tmp_path, 3, megapixels=0.1)
    assert len({Path(p).read_bytes() for p in paths}) == 3
    for path in paths:
        with Image.open(path) as img:
            assert img.format == "JPEG"
            assert 0.08e6 < img.width * img.height < 0.12e6


def test_meter_counts_each_forward_once_and_per_label() -> None:
    meter = ForwardMeter()

    class Inner:
        def forward(self, batch: Any) -> Any:
            return batch + 1

    class Outer:
        def forward(self, batch: Any) -> Any:  # a backend that calls another: counted once
            return inner(Inner(), batch)

    inner = meter.wrap(Inner.forward)
    outer = meter.wrap(Outer.forward)
    with meter.label("tagging"):
        assert outer(Outer(), 1) == 2
    assert inner(Inner(), 1) == 2
    assert meter.total.calls == 2
    assert meter.by_label["tagging"].calls == 1
    assert meter.by_label["-"].calls == 1


def test_meter_wraps_every_backend_class() -> None:
    from worker.models.backends import OnnxBackend, PipelineBackend, TorchBackend

    install_meter()
    install_meter()  # idempotent: never wrapped twice
    for cls in (TorchBackend, OnnxBackend, PipelineBackend):
        forward = cls.__dict__["forward"]
        assert hasattr(forward, "__wrapped__")
        assert not hasattr(forward.__wrapped__, "__wrapped__")
    before = METER.total.calls
    backend = TorchBackend(torch.nn.Conv2d(3, 4, 3), torch.device("cpu"))
    backend.forward(torch.zeros(1, 3, 8, 8))
    assert METER.total.calls == before + 1


@pytest.mark.slow  # loads every model of the steps twice (two thread settings): ~25 s quiet
def test_models_and_overhead_parts_run_the_worker_path(tmp_path: Path) -> None:
    from bench.inprocess import models_part, overhead_part

    ctx = _ctx(tmp_path)
    models = models_part(ctx)
    config = models["details"]["configs"]["1proc"]
    assert config["images"] >= 1
    assert config["per_step"]["tagging"]["forwards_per_image"] == 1  # one EfficientNet forward per photo
    assert config["per_step"]["metadata"]["model_ms"] == 0  # no model in the metadata step
    assert config["model_only_images_per_s"] > 0
    ctx.results["models"] = models
    assert ctx.model_only(1) == config["model_only_images_per_s"]

    overhead = overhead_part(ctx)
    d = overhead["details"]
    assert d["images"] >= 1 and d["outcomes"]
    assert all(n >= 0 for n in d["non_model_cpu_ms"])
    breakdown = d["breakdown_cpu_ms_per_image"]
    assert {"load + decode", "claim", "store", "step tagging (non-model)"} <= set(breakdown)
    # a step's CPU time contains its forwards' (also when a second part re-labels the steps)
    assert all(v >= 0 for k, v in breakdown.items() if k.startswith("step ")), breakdown
    assert breakdown["step tagging (non-model)"] > 0  # resize, normalise, top-k, embedding copy
    assert d["profile_top_non_model"], "the profile lists what is left"
    # the profiler is off during forwards: no convolution shows up as non-model time
    assert not any("conv2d" in row["function"] for row in d["profile_top_non_model"])


@pytest.mark.slow  # the first FlopCounterMode imports torch's tracing machinery: several seconds
def test_flops_of_a_convolution_and_a_matmul_peak() -> None:
    conv = torch.nn.Conv2d(3, 8, 3, bias=False)
    # 2 FLOPs per multiply-accumulate: out 8x6x6, 3x3x3 taps each
    assert count_flops(conv, torch.zeros(1, 3, 8, 8)) == 2 * 8 * 6 * 6 * 27
    assert matmul_peak(torch.device("cpu"), n=64, repeats=1) > 0


@pytest.mark.slow  # loads EfficientNet-Lite0 and counts a real forward
def test_flops_part_counts_loaded_models(tmp_path: Path) -> None:
    from bench.flops import flops_part

    ctx = _ctx(tmp_path)
    result = flops_part(ctx)
    rows = {row["model"]: row for row in result["details"]["models"]}
    assert rows["efficientnet-lite0"]["flops"] > 1e8  # ~0.4 GFLOP at 224 px
    assert rows["efficientnet-lite0"]["floor_ms"] > 0


def test_gpu_part_without_a_gpu_says_not_measured(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the part would measure")
    assert bench_main.gpu_part(_ctx(tmp_path)) == {"status": "not available", "reason": "no GPU: not measured"}


def test_backends_part_without_the_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_main, "BACKENDS_SCRIPT", tmp_path / "missing.py")
    result = bench_main.backends_part(_ctx(tmp_path))
    assert result["status"] == "not available"


def test_unknown_part_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench_main.parse_args(["modles"])
    assert "unknown part(s) modles" in capsys.readouterr().err


def test_table_json_and_plots_from_a_report(tmp_path: Path) -> None:
    report: dict[str, Any] = {
        "machine": {"date": "2026-11-30 02:00 UTC", "host_cores": 2, "cpu": "x", "python": "3.11", "torch": "2",
                    "onnxruntime": "1", "pillow": "13", "gpu": None},
        "steps": ["metadata"], "quick": True, "seconds": 1.0, "photos": "1 MP",
        "parts": {
            "models": {"status": "ok", "load_start": 1.0, "load_end": 2.0, "figures": [],
                       "details": {"configs": {"1proc": {"model_only_images_per_s": 2.0}}}},
            "e2e": {"status": "ok", "load_start": 1.0, "load_end": 2.0,
                    "figures": [{"name": "e2e metadata-only", "value": 50.0, "unit": "img/s", "target": ">= 100"}],
                    "details": {"runs": {"metadata-1": {"processes": 1, "images_per_s": 50.0},
                                         "metadata-2": {"processes": 2, "images_per_s": 90.0},
                                         "all-1": {"processes": 1, "images_per_s": 1.5},
                                         "all-2": {"processes": 2, "images_per_s": 1.8}}}},
            "latency": {"status": "ok", "load_start": 1.0, "load_end": 2.0, "figures": [],
                        "details": {"percentiles_ms": {"50": 20.0, "95": 40.0, "99": 80.0}, "offered_per_s": 30}},
            "gpu": {"status": "not available", "reason": "no GPU: not measured", "load_start": 1, "load_end": 1},
        },
    }
    text = bench_main.table(report)
    assert "| e2e | e2e metadata-only | 50.0 | img/s | >= 100 |" in text
    assert "| gpu | not available | – | | | no GPU: not measured |" in text
    source = tmp_path / "r.json"
    source.write_text(json.dumps(report))
    assert bench_main.main(["--from-json", str(source), "--plots", str(tmp_path / "img")]) == 0
    for name in ("bench-throughput.png", "bench-latency.png"):
        with Image.open(tmp_path / "img" / name) as img:
            assert img.width > 300 and img.height > 200
    assert throughput_png(tmp_path / "t.png", report["parts"]["e2e"], "s").is_file()
    assert latency_png(tmp_path / "l.png", report["parts"]["latency"], "s").is_file()


def test_percentiles() -> None:
    assert pct([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert pct([5.0], 99) == 5.0
    tally = Tally()
    tally.add(0.5, 0.25)
    assert (tally.calls, tally.wall, tally.cpu) == (1, 0.5, 0.25)


@pytest.mark.slow
def test_server_parts_run_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """e2e, latency and memory with tiny counts against the real Postgres and Redis (a Redis
    database of its own, flushed before and after), real `catalog` worker and ingest processes."""
    from bench.e2e import e2e_part, latency_part, memory_part

    monkeypatch.setattr(common, "REDIS_URL", REDIS_URL.rsplit("/", 1)[0] + "/14")
    ctx = _ctx(tmp_path, "--steps", "metadata")
    e2e = e2e_part(ctx)
    runs = e2e["details"]["runs"]
    assert {"metadata-1", "all-1"} <= set(runs)
    assert all(run["failed_images"] == 0 and run["images_per_s"] > 0 for run in runs.values())
    latency = latency_part(ctx)
    p = latency["details"]["percentiles_ms"]
    assert 0 < p[50] <= p[95] <= p[99]
    memory = memory_part(ctx)
    assert set(memory["details"]["rss_mb"]) == {"start", "500", "1000"}
    assert all(v > 0 for v in memory["details"]["rss_mb"].values())
    import redis

    assert redis.Redis.from_url(common.REDIS_URL).dbsize() == 0  # flushed afterwards

