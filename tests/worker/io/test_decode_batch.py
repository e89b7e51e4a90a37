"""decode_batch: several photos at once into tensors (the GPU path's decode), with the CPU
fallback. No GPU is needed: ``batched=True`` on the CPU runs the same code through
torchvision's CPU JPEG decoder that nvjpeg serves on CUDA."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from worker.config import load_settings
from worker.io.decode import DecodedTensor, decode_batch, decode_image
from worker.io.errors import ImageLoadError

pytest.importorskip("torchvision")


def _jpeg(image: Image.Image, orientation: int | None = None, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.convert(mode).save(buf, "JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(skimage.data.chelsea()).convert("RGB")  # 451 x 300: not square


def _close_to_pillow(result: DecodedTensor | ImageLoadError, data: bytes) -> None:
    assert isinstance(result, DecodedTensor)
    expected, _ = decode_image(data, load_settings())
    array = result.tensor.permute(1, 2, 0).numpy().astype(np.int16)
    assert array.shape == (expected.height, expected.width, 3)
    diff = np.abs(array - np.asarray(expected, dtype=np.int16))
    assert diff.mean() < 1.0 and diff.max() <= 24  # two IDCT/upsampling implementations


@pytest.mark.parametrize("orientation", [None, 2, 3, 4, 5, 6, 7, 8])
def test_batched_jpegs_match_pillow_upright(photo: Image.Image, orientation: int | None) -> None:
    data = _jpeg(photo, orientation)
    [result] = decode_batch([data], load_settings(), "cpu", batched=True)
    assert isinstance(result, DecodedTensor) and result.decoded_on == "nvjpeg"
    assert result.format == "JPEG" and result.tensor.dtype == torch.uint8
    _close_to_pillow(result, data)


def test_one_batch_mixes_fallbacks_and_errors_per_photo(photo: Image.Image) -> None:
    good = _jpeg(photo)
    grey = _jpeg(photo, mode="L")
    cmyk = _jpeg(photo, mode="CMYK")
    png = _png(photo)
    truncated = good[: len(good) // 3]
    datas = [good, png, truncated, grey, b"<html>no</html>", cmyk, good]
    results = decode_batch(datas, load_settings(), "cpu", batched=True)
    assert len(results) == len(datas)
    assert [getattr(r, "decoded_on", None) for r in results] == [
        "nvjpeg", "pillow", None, "nvjpeg", None, "pillow", "nvjpeg"]
    for data, result in zip(datas, results, strict=True):
        if isinstance(result, DecodedTensor):
            _close_to_pillow(result, data)
    assert isinstance(results[2], ImageLoadError) and results[2].code == "truncated"
    assert isinstance(results[4], ImageLoadError) and results[4].code == "not_an_image"
    assert isinstance(results[1], DecodedTensor) and results[1].format == "PNG"


def test_pixel_limit_is_checked_before_decoding(photo: Image.Image) -> None:
    settings = load_settings(max_pixels=100_000)  # the photo has 135,300 pixels
    [result] = decode_batch([_jpeg(photo)], settings, "cpu", batched=True)
    assert isinstance(result, ImageLoadError) and result.code == "too_many_pixels"
    assert "CATALOG_MAX_PIXELS" in str(result)


def test_cpu_default_is_pillow(photo: Image.Image) -> None:
    data = _jpeg(photo, 6)
    [result] = decode_batch([data], load_settings(), "cpu")
    assert isinstance(result, DecodedTensor) and result.decoded_on == "pillow"
    expected, _ = decode_image(data, load_settings())
    assert torch.equal(result.tensor, torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1))
