"""The metadata step: sizes and hashes, and the bounded JPEG thumbnail the review pages show
(remote photos are never fetched by the review service, so the worker stores what it shows)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from worker.config import Settings
from worker.io.decode import decode_image
from worker.pipeline.contract import ImageContext
from worker.steps.metadata import MetadataStep, thumbnail_size


def _photo(width: int, height: int) -> Image.Image:
    """A photo with structure (a gradient and a bright square top left) so that resizing and
    orientation can be checked on its pixels."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    pixels = np.stack([np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width)),
                       np.full((height, width), 60, np.float32)], axis=-1).astype(np.uint8)
    pixels[: height // 4, : width // 4] = 255
    return Image.fromarray(pixels)


def _jpeg(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def _ctx(raw: bytes, settings: Settings, image_id: int = 4321) -> ImageContext:
    image, fmt = decode_image(raw, settings)
    return ImageContext(image_id=image_id, listing_id=1, seller_id="s", category=None,
                        url="https://img.example/p.jpg", image=image, raw=raw, source_format=fmt,
                        sha256="0" * 64, settings=settings)


def test_thumbnail_is_a_bounded_jpeg_in_the_artifact_dir(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    result = MetadataStep().run(_ctx(_jpeg(_photo(2000, 1500)), settings))
    assert (result.data["width"], result.data["height"]) == (2000, 1500)
    [thumb] = result.artifacts
    assert thumb.kind == "thumbnail"
    assert (thumb.width, thumb.height) == (640, 480)
    assert thumb.path.parent.parent == settings.effective_artifact_dir
    assert thumb.path.name == "4321-thumb.jpg"
    with Image.open(thumb.path) as stored:
        assert (stored.format, stored.mode, stored.size) == ("JPEG", "RGB", (640, 480))
        pixels = np.asarray(stored, dtype=np.int16)
    # The same picture, scaled: the bright square is still top left, the gradient still runs.
    blue = pixels[..., 2]  # 60 everywhere but in the bright square
    assert blue[:100, :140].min() > 220 and blue[200:, 200:].max() < 120
    # No temporary file left next to it.
    assert [p.name for p in thumb.path.parent.iterdir()] == ["4321-thumb.jpg"]


def test_a_small_photo_is_not_upscaled_and_the_side_is_a_setting(make_settings: Callable[..., Settings]) -> None:
    small = MetadataStep().run(_ctx(_jpeg(_photo(120, 90)), make_settings()))
    assert (small.artifacts[0].width, small.artifacts[0].height) == (120, 90)
    with Image.open(small.artifacts[0].path) as stored:
        assert stored.size == (120, 90)
    tall = MetadataStep().run(_ctx(_jpeg(_photo(300, 1200)), make_settings(thumbnail_side=200)))
    with Image.open(tall.artifacts[0].path) as stored:
        assert stored.size == (50, 200) == (tall.artifacts[0].width, tall.artifacts[0].height)


def test_thumbnail_is_upright_like_the_decoded_photo(make_settings: Callable[..., Settings]) -> None:
    """A phone photo stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to
    view): the thumbnail is portrait, as the photo is seen, and carries no EXIF of its own."""
    exif = Image.Exif()
    exif[0x0112] = 6
    raw = _jpeg(_photo(800, 600), exif=exif.tobytes())
    result = MetadataStep().run(_ctx(raw, make_settings()))
    with Image.open(result.artifacts[0].path) as stored:
        assert stored.size == (480, 640)
        assert stored.getexif().get(0x0112) is None
        pixels = np.asarray(stored, dtype=np.int16)
    # Rotated clockwise, the bright top-left square of the sideways photo lands top right.
    blue = pixels[..., 2]  # 60 everywhere but in the bright square
    assert blue[:100, -80:].min() > 220 and blue[:100, :80].max() < 120


def test_analysing_again_replaces_the_thumbnail(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    first = MetadataStep().run(_ctx(_jpeg(_photo(1000, 1000)), settings)).artifacts[0]
    second = MetadataStep().run(_ctx(_jpeg(_photo(1000, 500)), settings)).artifacts[0]
    assert first.path == second.path
    with Image.open(second.path) as stored:
        assert stored.size == (640, 320)


def test_version_names_the_thumbnail_rules(make_settings: Callable[..., Settings]) -> None:
    assert MetadataStep().version(make_settings()) == "metadata@2"


@pytest.mark.parametrize(("size", "side", "expected"), [
    ((2000, 1500), 640, (640, 480)), ((1500, 2000), 640, (480, 640)), ((640, 10), 640, (640, 10)),
    ((1, 20000), 640, (1, 640)), ((20000, 1), 640, (640, 1)), ((641, 641), 640, (640, 640)),
])
def test_thumbnail_size(size: tuple[int, int], side: int, expected: tuple[int, int]) -> None:
    assert thumbnail_size(size, side) == expected


def test_thumbnails_of_two_images_do_not_collide(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    a = MetadataStep().run(_ctx(_jpeg(_photo(100, 100)), settings, image_id=1)).artifacts[0]
    b = MetadataStep().run(_ctx(_jpeg(_photo(100, 100)), settings, image_id=2)).artifacts[0]
    assert a.path != b.path and a.path.is_file() and b.path.is_file()


def test_metadata_step_does_not_import_torch() -> None:
    """A worker with only the metadata step never loads torch (~0.7 GB of RSS): the thumbnail
    uses torch's kernels only where a model step has imported it already."""
    import subprocess
    import sys

    code = ("import sys, worker.steps.metadata, worker.io.lanczos; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_thumbnail_without_torch_is_pillow_s_bicubic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import skimage.data
    import torch  # noqa: F401 - as in a worker with model steps

    from worker.steps.metadata import THUMBNAIL_QUALITY, write_thumbnail

    photo = Image.fromarray(skimage.data.astronaut()).resize((1225, 816))
    with_torch = write_thumbnail(photo, 640, tmp_path / "a.jpg")
    monkeypatch.delitem(sys.modules, "torch")  # as in a metadata-only worker
    without = write_thumbnail(photo, 640, tmp_path / "b.jpg")
    expected = io.BytesIO()
    photo.resize((640, 426), Image.Resampling.BICUBIC, reducing_gap=2.0).save(expected, "JPEG",
                                                                             quality=THUMBNAIL_QUALITY)
    assert without.path.read_bytes() == expected.getvalue()
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (with_torch.path, without.path))
    assert (with_torch.width, with_torch.height) == (without.width, without.height) == (640, 426)
    assert float(np.abs(a - b).mean()) < 0.5  # the same filter up to rounding, then JPEG
