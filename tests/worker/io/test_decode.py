"""worker.io.decode: bombs are named as bombs, in our settings' terms, and decoding keeps at
most the decoded frame and the RGB result in memory (issue 12, items 9 and 14)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.support import images
from worker.config import load_settings
from worker.io.decode import _webp_size, decode_image
from worker.io.errors import ImageLoadError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def settings(tmp_path: Path):
    return load_settings(data_dir=tmp_path / "data")


def refused(data: bytes, settings) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        decode_image(data, settings)
    return info.value


# --- item 14: misleading reasons ------------------------------------------------------------


@pytest.mark.parametrize("kind", [b"zTXt", b"iTXt", b"iCCP"])
@pytest.mark.parametrize("after_pixels", [False, True], ids=["before-pixels", "after-pixels"])
def test_png_metadata_bomb_is_a_decompression_bomb_not_truncation(tmp_path: Path, settings, kind: bytes,
                                                                  after_pixels: bool) -> None:
    path = images.write_png_text_bomb(tmp_path / "bomb.png", kind=kind, after_pixels=after_pixels)
    assert path.stat().st_size < 200_000  # 64 MiB once expanded
    err = refused(path.read_bytes(), settings)
    assert err.code == "decompression_bomb", str(err)
    assert "decompression bomb" in str(err) and "truncated" not in str(err) and "corrupt" not in str(err)
    assert "MAX_TEXT" not in str(err)  # Pillow's internal names are not ours to quote


def test_many_small_text_chunks_adding_up_are_a_decompression_bomb(tmp_path: Path, settings) -> None:
    path = images.write_png_text_bomb(tmp_path / "many.png", expanded=1_000_000, chunks=70)
    err = refused(path.read_bytes(), settings)
    assert err.code == "decompression_bomb" and "64 MiB in all" in str(err)


def test_png_with_modest_text_still_decodes(tmp_path: Path, settings) -> None:
    path = images.write_png_text_bomb(tmp_path / "fine.png", expanded=100_000)
    image, fmt = decode_image(path.read_bytes(), settings)
    assert fmt == "PNG" and image.size == (8, 8)


@pytest.mark.parametrize("container", ["VP8L", "VP8X", "VP8"])
def test_webp_bomb_is_told_in_terms_of_catalog_max_pixels(tmp_path: Path, settings, container: str) -> None:
    path = images.write_webp_bomb(tmp_path / "bomb.webp", container=container)
    assert path.stat().st_size < 200
    err = refused(path.read_bytes(), settings)
    assert err.code == "too_many_pixels"
    assert "50.0 MP limit (CATALOG_MAX_PIXELS)" in str(err) and "= 268.4 MP" in str(err)
    assert "178956970" not in str(err) and "DOS" not in str(err)


def test_webp_above_pillows_own_limit_but_allowed_by_ours_says_so(tmp_path: Path) -> None:
    path = images.write_webp_bomb(tmp_path / "bomb.webp", side=16384)
    err = refused(path.read_bytes(), load_settings(data_dir=tmp_path / "data", max_pixels=300_000_000))
    assert err.code == "too_many_pixels" and "CATALOG_MAX_PIXELS (300.0 MP) would allow it" in str(err)
    assert "178956970" not in str(err)


@pytest.mark.parametrize(("container", "size"), [("VP8L", (33, 17)), ("VP8X", (33, 17)), ("VP8", (34, 18))])
def test_webp_header_size_matches_pillow(tmp_path: Path, container: str, size: tuple[int, int]) -> None:
    path = tmp_path / "x.webp"
    photo = images.photo(size)
    if container == "VP8L":
        photo.save(path, "WEBP", lossless=True)
    elif container == "VP8X":
        photo.putalpha(128)
        exif = Image.Exif()
        exif[0x010F] = "test"
        photo.save(path, "WEBP", lossless=True, exif=exif.tobytes())
    else:
        photo.save(path, "WEBP", quality=80)
    data = path.read_bytes()
    assert data[12:16] == {"VP8L": b"VP8L", "VP8X": b"VP8X", "VP8": b"VP8 "}[container]
    with Image.open(path) as opened:
        assert _webp_size(data) == opened.size == size


def test_pillow_byte_literals_are_not_quoted(tmp_path: Path, settings) -> None:
    data = bytearray(images.write_photo(tmp_path / "p.png", size=(16, 16)).read_bytes())
    data[37:41] = b"\x01secret"[:4]  # the first chunk after IHDR gets a name Pillow quotes as bytes
    err = refused(bytes(data), settings)
    assert "b'" not in str(err) and "secr" not in str(err)


def test_not_an_image_never_quotes_the_bytes(settings) -> None:
    for data, hint in ((b"root:x:0:0:root:/root:/bin/bash\n", "looks like text"),
                       (b"<!DOCTYPE html><html><body>secret</body></html>", "HTML page"),
                       (b'{"token": "secret"}', "JSON"),
                       (bytes(range(1, 200)) + b"secret", "no known image signature")):
        err = refused(data, settings)
        assert err.code == "not_an_image" and hint in str(err)
        assert "root:" not in str(err) and "secret" not in str(err) and "starts with" not in str(err)


# --- item 9: fewer full-size copies, same pixels ----------------------------------------------


def _reference_rgb(path: Path) -> np.ndarray:
    """What the decoder produced before it was made lean: exif_transpose, then alpha_composite
    onto white (or a plain convert), via Pillow's straightforward calls."""
    with Image.open(path) as opened:
        upright = ImageOps.exif_transpose(opened)
    if upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info:
        rgba = upright.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(upright.convert("RGB"))


@pytest.mark.parametrize("name", ["rgba.png", "la.png", "palette.png", "rotated.jpg", "rgb.jpg", "cmyk.jpg",
                                  "grey.png", "rgba-rotated.png"])
def test_lean_decoding_gives_the_same_pixels(tmp_path: Path, settings, name: str) -> None:
    path = tmp_path / name
    if name == "rgba.png":
        images.write_rgba_photo(path, (97, 61))
    elif name == "la.png":
        images.write_rgba_photo(tmp_path / "tmp.png", (50, 40))
        Image.open(tmp_path / "tmp.png").convert("LA").save(path)
    elif name == "palette.png":
        images.write_palette_png(path)
    elif name == "rotated.jpg":
        images.write_exif_rotated_jpeg(path, size=(80, 40), orientation=6)
    elif name == "rgb.jpg":
        images.write_photo(path, size=(90, 70))
    elif name == "cmyk.jpg":
        images.write_cmyk_jpeg(path)
    elif name == "grey.png":
        images.photo((40, 30)).convert("L").save(path)
    else:
        images.write_rgba_photo(tmp_path / "tmp.png", (60, 30))
        exif = Image.Exif()
        exif[0x0112] = 8
        Image.open(tmp_path / "tmp.png").save(path, exif=exif.tobytes())
    image, _fmt = decode_image(path.read_bytes(), settings)
    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image), _reference_rgb(path))


def test_rgb_result_outlives_the_decoder(tmp_path: Path, settings) -> None:
    """The RGB frame is handed over without a copy: it must survive the decoder's close."""
    image, _fmt = decode_image(images.write_photo(tmp_path / "p.png", size=(30, 20)).read_bytes(), settings)
    image.load()
    assert image.getpixel((5, 5)) is not None and np.asarray(image).shape == (20, 30, 3)


def test_wide_greyscale_in_strips_matches_whole_image_scaling(tmp_path: Path, settings, monkeypatch) -> None:
    import worker.io.decode as decode

    monkeypatch.setattr(decode, "_STRIP_PIXELS", 64)  # many strips even for a small image
    values = np.linspace(-3.5, 1000.25, 40 * 30, dtype=np.float32).reshape(30, 40)
    values[3, 4] = np.nan
    path = tmp_path / "f.tiff"
    Image.fromarray(values, "F").save(path)
    image, _ = decode_image(path.read_bytes(), settings)
    finite = values[np.isfinite(values)]
    low, high = float(finite.min()), float(finite.max())
    expected = np.clip(np.nan_to_num(np.rint((values.astype(np.float64) - low) * (255.0 / (high - low)))), 0, 255)
    assert np.array_equal(np.asarray(image)[..., 0], expected.astype(np.uint8))


# Peak resident memory of this process's address space (VmHWM). Not getrusage's ru_maxrss:
# Linux carries that over from the parent across fork and exec, so under pytest it starts at
# the test runner's own peak and hides the decode.
_MEASURE = """
import json, sys
def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
from worker.config import load_settings
from worker.io.decode import decode_image
data = open(sys.argv[1], "rb").read()
settings = load_settings(data_dir=sys.argv[2])
decode_image(open(sys.argv[3], "rb").read(), settings)  # warm up: imports, allocator pools
before = peak_kib()
image, fmt = decode_image(data, settings)
print(json.dumps({"peak_kib": peak_kib() - before, "size": image.size}))
"""


def _peak_bytes_per_pixel(path: Path, tmp_path: Path) -> float:
    small = images.write_photo(tmp_path / "warm.png", size=(64, 64))
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(tmp_path / "data"), str(small)],
                         capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    width, height = result["size"]
    return result["peak_kib"] * 1024 / (width * height)


@pytest.mark.timeout(180)
def test_rgba_photo_decode_peak_memory_is_the_frame_plus_the_result(tmp_path: Path) -> None:
    """A 16 MP RGBA photo: decoded RGBA (4 B/px) + RGB result (3 B/px) is the floor. Before,
    orientation, conversion and compositing kept four more full-size copies (~24 B/px; a
    49 MP photo peaked at +1.1 GiB, now +0.37 GiB)."""
    path = images.write_rgba_photo(tmp_path / "big.png", (4000, 4000))
    per_pixel = _peak_bytes_per_pixel(path, tmp_path)
    assert per_pixel < 12, f"decode peaked at {per_pixel:.1f} bytes per pixel"
