"""Super-resolution: the ncnn->torch port matches ncnn, tiling is seamless, the step
skips/produces what it should, and the in-house trainer writes a usable checkpoint.

Real-ESRGAN is heavy on a CPU, so its inputs here are 24-32 px."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from worker.config import load_settings
from worker.models import ncnn
from worker.models.tiling import plan_windows, upscale_tiled
from worker.pipeline.contract import ImageContext, StepUnavailable
from worker.steps.superres import CompactSR, SuperResStep, find_model, load_inhouse


def _wheel_or_skip(name: str) -> ncnn.NcnnModelSpec:
    spec = ncnn.NCNN_MODELS[name]
    try:
        ncnn.package_dir(spec.package)
    except FileNotFoundError:
        pytest.skip(f"{spec.package} is not installed")
    return spec


def _ncnn_reference_or_skip(spec: ncnn.NcnnModelSpec, image: np.ndarray) -> np.ndarray:
    try:
        return ncnn.ncnn_reference(spec, image)
    except (ImportError, OSError) as exc:  # the wheel's .so needs libvulkan1 + libomp5
        pytest.skip(f"ncnn reference cannot run here: {exc}")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """On a shared 2-core machine two OpenMP threads ran Real-ESRGAN ~5x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ported() -> dict[str, ncnn.NcnnSR]:
    models = {}
    for name in ncnn.NCNN_MODELS:
        models[name], _ = ncnn.build_from_ncnn(_wheel_or_skip(name))
    return models


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """waifu2x imported through the real import path (verified against ncnn)."""
    _wheel_or_skip("waifu2x-photo")
    dest = tmp_path_factory.mktemp("sr-models")
    report = ncnn.import_ncnn_models(dest, names=["waifu2x-photo"], verify_size=32)
    if report["waifu2x-photo"]["status"] == "refused" and "cannot run" in report["waifu2x-photo"]["error"]:
        pytest.skip(report["waifu2x-photo"]["error"])
    assert report["waifu2x-photo"]["status"] == "installed", report
    return dest


# --------------------------------------------------------------------------- converter


def test_param_parser_reads_layers_and_arrays() -> None:
    spec = _wheel_or_skip("realesrgan-x4plus")
    layers = ncnn.parse_param(ncnn.package_dir(spec.package) / spec.param)
    assert layers[0].type == "Input"
    conv = next(layer for layer in layers if layer.type == "Convolution" and layer.get(9) == 2)
    assert conv.get(10) == [pytest.approx(0.2)]  # -23310=1,2e-01 -> leaky slope
    eltwise = next(layer for layer in layers if layer.type == "Eltwise")
    assert eltwise.get(1) == [pytest.approx(0.2), pytest.approx(1.0)]


@pytest.mark.parametrize("name", ["waifu2x-photo", "realesrgan-x4plus"])
def test_torch_port_matches_ncnn(ported: dict[str, ncnn.NcnnSR], name: str) -> None:
    spec = ncnn.NCNN_MODELS[name]
    image = ncnn.verification_image(32)
    reference = _ncnn_reference_or_skip(spec, image)
    ours = ncnn.run_uint8(ported[name], image)
    assert ours.shape == reference.shape == (32 * spec.scale, 32 * spec.scale, 3)
    assert ncnn.psnr(ours, reference) >= 40.0


def test_import_writes_loadable_model_without_ncnn(model_dir: Path, ported: dict[str, ncnn.NcnnSR]) -> None:
    arch = json.loads((model_dir / "waifu2x-photo.json").read_text())
    assert arch["verified"] is True and arch["scale"] == 2
    assert arch["psnr_vs_ncnn_db"] == "inf" or arch["psnr_vs_ncnn_db"] >= 40
    state = torch.load(model_dir / "waifu2x-photo.pt", weights_only=True)
    model = ncnn.model_from_json(arch, state)
    image = ncnn.verification_image(24)
    assert np.array_equal(ncnn.run_uint8(model, image), ncnn.run_uint8(ported["waifu2x-photo"], image))


def test_import_refuses_a_model_that_does_not_match(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _wheel_or_skip("waifu2x-photo")
    real_build = ncnn.build_from_ncnn

    def damaged(spec):  # a converter bug: one layer's weights off by 50%
        model, layers = real_build(spec)
        with torch.no_grad():
            next(model.parameters()).mul_(1.5)
        return model, layers

    monkeypatch.setattr(ncnn.port, "build_from_ncnn", damaged)  # where import_ncnn_models looks it up
    report = ncnn.import_ncnn_models(tmp_path, names=["waifu2x-photo"], verify_size=24)
    if "cannot run" in report["waifu2x-photo"].get("error", ""):
        pytest.skip(report["waifu2x-photo"]["error"])
    assert report["waifu2x-photo"]["status"] == "refused"
    assert report["waifu2x-photo"]["psnr_db"] < 40
    assert list(tmp_path.iterdir()) == []  # nothing installed, no temporary left behind


# --------------------------------------------------------------------------- tiling


def test_windows_partition_the_image() -> None:
    for height, width, tile, overlap in [(40, 36, 16, 8), (100, 7, 10, 3), (5, 5, 16, 8)]:
        covered = np.zeros((height, width), dtype=int)
        windows = plan_windows(height, width, tile, overlap)
        sizes = {(w.y1 - w.y0, w.x1 - w.x0) for w in windows}
        assert len(sizes) == 1  # one shape: any windows can share a batch
        for w in windows:
            covered[w.keep_y0 : w.keep_y1, w.keep_x0 : w.keep_x1] += 1
            assert w.y0 <= w.keep_y0 < w.keep_y1 <= w.y1 and w.x0 <= w.keep_x0 < w.keep_x1 <= w.x1
            # a kept pixel has `overlap` px of real context unless it is at the image border
            assert w.keep_y0 - w.y0 >= overlap - 1 or w.y0 == 0
            assert w.x1 - w.keep_x1 >= overlap - 1 or w.x1 == width
        assert (covered == 1).all()


@pytest.mark.parametrize(
    "name,size,tile,overlap",
    [("waifu2x-photo", (40, 36), 16, 8), ("realesrgan-x4plus", (72, 20), 16, 24)],
)
def test_tiled_equals_untiled(ported: dict[str, ncnn.NcnnSR], name: str, size: tuple[int, int],
                              tile: int, overlap: int) -> None:
    model = ported[name]
    image = ncnn.verification_image(max(size))[: size[0], : size[1]]
    x = torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255.0
    assert len(plan_windows(size[0], size[1], tile, overlap)) > 1
    with torch.inference_mode():
        whole = upscale_tiled(x, model, model.scale, tile=1000, overlap=0)
        tiled = upscale_tiled(x, model, model.scale, tile=tile, overlap=overlap, max_batch=2)
    assert tiled.shape == whole.shape == (size[0] * model.scale, size[1] * model.scale, 3)
    assert ncnn.psnr(tiled, whole) >= 45.0


# --------------------------------------------------------------------------- step


def _ctx(tmp_path: Path, image: Image.Image, **settings) -> ImageContext:
    return ImageContext(
        image_id=7, listing_id=1, seller_id="s1", category=None, url="http://example.invalid/a.jpg",
        image=image, raw=b"", source_format="PNG", sha256="0" * 64,
        settings=load_settings(data_dir=tmp_path, batch_timeout_ms=1.0, **settings),
    )


def _photo(width: int, height: int) -> Image.Image:
    from skimage import data

    return Image.fromarray(data.coffee()).resize((width, height), Image.Resampling.LANCZOS)


def test_step_skips_large_images(tmp_path: Path, model_dir: Path) -> None:
    ctx = _ctx(tmp_path, _photo(640, 520), sr_model_dir=model_dir)
    result = SuperResStep().run(ctx)
    assert "skipped" in result.data and not result.artifacts


def test_step_writes_x2_artifact(tmp_path: Path, model_dir: Path) -> None:
    original = _photo(60, 44)
    before = original.tobytes()
    ctx = _ctx(tmp_path, original, sr_model_dir=model_dir, sr_target_side=80, sr_tile=24, sr_tile_overlap=8)
    step = SuperResStep()
    result = step.run(ctx)
    (artifact,) = result.artifacts
    assert artifact.kind == "superres" and (artifact.width, artifact.height) == (120, 88)
    with Image.open(artifact.path) as written:
        assert written.size == (120, 88) and written.format == "PNG"
    assert artifact.path.parent == ctx.artifact_dir
    assert result.data["scale"] == 2 and result.data["models"][0].startswith("waifu2x-photo@")
    assert original.tobytes() == before  # the original is untouched
    assert "waifu2x-photo@" in step.version(ctx.settings)


def test_step_unavailable_without_weights(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, _photo(60, 44), sr_model="realesrgan-x4plus", sr_model_dir=tmp_path / "empty")
    with pytest.raises(StepUnavailable):
        SuperResStep().run(ctx)


def test_step_inhouse_x4(tmp_path: Path) -> None:
    """In-house model at x4 (a trained x4 checkpoint, or two x2 passes)."""
    model_dir = tmp_path / "models"
    _tiny_checkpoint(model_dir, scale=2)
    ctx = _ctx(tmp_path, _photo(30, 20), sr_model="inhouse", sr_model_dir=model_dir, sr_target_side=100)
    result = SuperResStep().run(ctx)
    (artifact,) = result.artifacts
    assert (artifact.width, artifact.height) == (120, 80)
    assert result.data["scale"] == 4


def _tiny_checkpoint(model_dir: Path, scale: int) -> Path:
    from worker.training.sr import save_checkpoint

    torch.manual_seed(0)
    path = model_dir / f"inhouse-x{scale}.pt"
    save_checkpoint(CompactSR(scale, features=8, blocks=1), path)
    assert find_model("inhouse", scale, model_dir) is not None
    return path


# --------------------------------------------------------------------------- training


def test_tiny_training_run_writes_checkpoint(tmp_path: Path) -> None:
    from skimage import data

    from worker.training.sr import train_sr

    photos = []
    for name in ("astronaut", "rocket", "coffee"):
        path = tmp_path / f"{name}.png"
        Image.fromarray(getattr(data, name)()).resize((128, 96)).save(path)
        photos.append(path)
    result = train_sr(photos[:2], tmp_path / "out", scale=2, steps=4, batch_size=4, patch=32,
                      features=8, blocks=1, eval_images=photos[2:], eval_every=2, progress=False)
    checkpoint = Path(result["checkpoint"])
    assert checkpoint.is_file() and checkpoint.stat().st_size < 1_000_000
    model, saved = load_inhouse(checkpoint)
    assert saved["eval_images"] == ["coffee.png"] and "coffee.png" not in saved["train_images"]
    assert {"psnr", "ssim", "bicubic_psnr"} <= set(saved["metrics"])
    out = model(torch.rand(1, 3, 10, 12))
    assert out.shape == (1, 3, 20, 24)
    assert (tmp_path / "out" / "inhouse-x2.metrics.json").is_file()


def test_training_refuses_overlapping_eval_set(tmp_path: Path) -> None:
    from worker.training.sr import train_sr

    path = tmp_path / "a.png"
    Image.new("RGB", (64, 64)).save(path)
    with pytest.raises(ValueError, match="also in the training set"):
        train_sr([path], tmp_path / "out", steps=1, eval_images=[path], progress=False)


@pytest.mark.parametrize("scale", [2, 4])
def test_shipped_inhouse_checkpoints(scale: int) -> None:
    """The committed checkpoints are small, loadable, and were validated on held-out photos
    that are not benchmark photos."""
    from worker.steps.superres import PACKAGED_DIR
    from worker.training.sr import BENCH_PHOTOS

    path = PACKAGED_DIR / f"sr_inhouse_x{scale}.pt"
    assert path.stat().st_size < 1_000_000
    model, saved = load_inhouse(path)
    assert model.scale == scale
    assert saved["metrics"]["gain_db"] > 0.5
    bench_names = {spec.split(":")[-1].rsplit("/", 1)[-1].split(".")[0] for spec in BENCH_PHOTOS}
    used = {name.split(".")[0] for name in saved["train_images"] + saved["eval_images"]}
    assert not used & bench_names
