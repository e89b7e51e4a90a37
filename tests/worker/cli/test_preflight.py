"""Start-up checks (issue 13, item 2): a setting that cannot work stops the command before it
takes work, with one sentence naming the variable; nothing is loaded to find out."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.support.images import write_photo
from worker.cli import preflight as pf
from worker.cli.main import main
from worker.config import load_settings
from worker.models.runtime import clear_models


@pytest.fixture(autouse=True)
def _fresh_models():
    clear_models()  # model instances cache their versions per configuration
    yield
    clear_models()


def test_cuda_requested_without_cuda_is_refused(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, device="cuda", steps=["metadata"])
    with pytest.raises(pf.PreflightError, match="CATALOG_DEVICE=cuda but no CUDA device is visible"):
        pf.preflight(settings, cuda=False)
    pf.preflight(settings, cuda=True)  # with CUDA it passes
    pf.preflight(settings, models=False, cuda=False)  # ingest and api do not use the device


def test_the_cuda_check_creates_no_cuda_context(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    pf.cuda_available()
    import os

    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"


def test_step_without_its_weights_names_the_step_and_what_is_missing(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, device="cpu", steps=["metadata", "detection"],
                             detector="torchvision:fasterrcnn_mobilenet_v3_large_fpn")
    with pytest.raises(pf.PreflightError, match=r"CATALOG_STEPS: step 'detection' cannot run: .*"
                                                 r"CATALOG_DETECTOR_CHECKPOINT"):
        pf.preflight(settings)


def test_missing_package_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "rembg" else real(name, *a))
    settings = load_settings(data_dir=tmp_path, device="cpu", steps=["segmentation"])
    with pytest.raises(pf.PreflightError, match=r"step 'segmentation' cannot run: package 'rembg' is not installed"):
        pf.preflight(settings)


def test_super_resolution_without_weights_names_the_model_and_folder(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, device="cpu", steps=["superres"], sr_model="waifu2x-photo")
    with pytest.raises(pf.PreflightError, match=r"CATALOG_SR_MODEL=waifu2x-photo has no weights in .*models"):
        pf.preflight(settings)


def test_the_default_installation_passes(tmp_path: Path) -> None:
    pf.preflight(load_settings(data_dir=tmp_path, device="cpu"))


def test_process_stops_before_touching_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CATALOG_DEVICE", "cuda")
    monkeypatch.setenv("CATALOG_STEPS", "metadata")
    monkeypatch.setattr(pf, "cuda_available", lambda: False)
    write_photo(tmp_path / "a.jpg", size=(64, 48), seed=1)
    result = CliRunner().invoke(main, ["process", str(tmp_path / "a.jpg")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: CATALOG_DEVICE=cuda but no CUDA device is visible (no NVIDIA driver/GPU, or "
        "CUDA_VISIBLE_DEVICES hides it): use CATALOG_DEVICE=auto or cpu"]
    assert not (tmp_path / "data" / "catalog.db").exists()


@pytest.mark.parametrize("args", [["worker"], ["worker", "-Q", "gpu"], ["demo"]])
def test_worker_and_demo_refuse_a_missing_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                args: list[str]) -> None:
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CATALOG_STEPS", "metadata,superres")
    monkeypatch.setenv("CATALOG_SR_MODEL", "realesrgan-x4plus")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "CATALOG_STEPS: step 'superres' cannot run" in result.output
    assert "Traceback" not in result.output


def test_a_worker_on_the_ingest_queue_needs_no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.cli.services import _runs_images

    assert not _runs_images(["-Q", "ingest"]) and not _runs_images(["--queues=ingest,train"])
    assert _runs_images([]) and _runs_images(["-Q", "ingest,cpu"]) and _runs_images(["-Qgpu"])


@pytest.mark.parametrize(("var", "value"), [("CATALOG_DETECTOR", "yolov8"),
                                             ("CATALOG_TAXONOMY_PATH", "/nope.yaml")])
@pytest.mark.parametrize("command", ["worker", "ingest", "api", "process", "demo"])
def test_every_long_running_command_refuses_a_bad_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          var: str, value: str, command: str) -> None:
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path))
    monkeypatch.setenv(var, value)
    args = [command, str(tmp_path)] if command == "process" else [command]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and result.output.startswith(f"Error: invalid configuration:\n  {var}: ")


def test_a_webhook_the_fetch_fence_refuses_stops_every_process(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, steps=["metadata"], webhook_secret="k",
                             webhook_url="http://10.1.2.3:8080/hook")
    for models in (True, False):  # workers, and ingest/api alike
        with pytest.raises(pf.PreflightError, match="^CATALOG_WEBHOOK_URL: refused to post to"):
            pf.preflight(settings, models=models, cuda=False)
    allowed = load_settings(data_dir=tmp_path, steps=["metadata"], webhook_secret="k",
                            webhook_url="http://10.1.2.3:8080/hook", fetch_allow_hosts="10.1.2.3:8080")
    pf.preflight(allowed, models=False, cuda=False)
