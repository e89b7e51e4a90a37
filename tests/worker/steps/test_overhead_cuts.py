"""The overhead cuts of issue 14 change how fast, never what is computed.

Each cut is compared with the computation it replaced, written out here as it was: the
duplicate fingerprints (one grey conversion instead of one per view), the metadata hashes
(one grey conversion for both), error-level analysis (integer differences) and the cutout
PNG (a faster zlib level, same pixels): exact equality on real photos, not a tolerance, since
stored hashes and index bands of older photos must keep matching new ones. The thumbnail (a
picture for people, analysed by nothing) moved from Lanczos to bicubic resampling: about half
a grey level apart on average before the JPEG encoding, under two after it (checked below).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageOps

from worker.fraud import fingerprint as fp
from worker.fraud.tamper import BLOCK, ELA_MAX_SIDE, ELA_QUALITY, error_level
from worker.io.hashing import _dct_matrix, dhash, hashes, phash
from worker.models.common import fit_within
from worker.steps.metadata import THUMBNAIL_QUALITY, thumbnail_size, write_thumbnail
from worker.steps.segmentation import Mask, write_cutout


def _photos() -> list[Image.Image]:
    photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
              for name in ("coffee", "astronaut", "chelsea", "rocket")]
    framed = ImageOps.expand(photos[0], border=(40, 0, 40, 0), fill=(255, 255, 255))  # trimmed view
    return [photos[0], photos[1].resize((1224, 816)), framed, Image.fromarray(skimage.data.camera())]


# --- the computations as they were before the cuts ------------------------------------


def _old_gray(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(image.convert("L").resize(size, Image.Resampling.LANCZOS), dtype=np.float64)


def _old_bits(bits: np.ndarray) -> int:
    value = 0
    for bit in bits.ravel():
        value = (value << 1) | int(bool(bit))
    return value


def _old_phash(image: Image.Image) -> int:
    pixels = _old_gray(image, (32, 32))
    dct = _dct_matrix(32)
    coeffs = (dct @ pixels @ dct.T)[:8, :8]
    return _old_bits(coeffs > np.median(coeffs.ravel()[1:]))


def _old_dhash(image: Image.Image) -> int:
    pixels = _old_gray(image, (9, 8))
    return _old_bits(pixels[:, 1:] > pixels[:, :-1])


def _old_views(image: Image.Image, query: bool) -> dict[str, Image.Image]:
    image = image.convert("RGB")
    if max(image.size) > fp.WORKING_SIDE:
        image = image.copy()
        image.thumbnail((fp.WORKING_SIDE, fp.WORKING_SIDE), Image.Resampling.LANCZOS)
    out = {"full": image}
    trimmed = fp.trim_borders(image)
    if trimmed.size != image.size:
        out["trim"] = trimmed
    for keep in fp.CENTRE_CROPS:
        out[f"c{round(keep * 100)}"] = fp.centre_crop(trimmed, keep)
    out.update(fp.anchored_crops(trimmed, fp.ANCHORED_CUT, "cut_"))
    if query:
        for keep in fp.QUERY_CENTRE_CROPS:
            out[f"qc{round(keep * 100)}"] = fp.centre_crop(trimmed, keep)
        out.update(fp.anchored_crops(trimmed, fp.QUERY_CUT, "qcut_"))
    return out


def _old_fingerprint(image: Image.Image, query: bool) -> list[tuple[str, str, bool, int]]:
    out = []
    for view, img in _old_views(image, query).items():
        out += [("phash", view, False, _old_phash(img)), ("dhash", view, False, _old_dhash(img))]
        if query and "cut_" not in view:
            mirror = ImageOps.mirror(img)
            out += [("phash", view, True, _old_phash(mirror)), ("dhash", view, True, _old_dhash(mirror))]
    return out


def _old_ela_diff(image: Image.Image) -> np.ndarray:
    rgb, _ = fit_within(image.convert("RGB"), ELA_MAX_SIDE, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=ELA_QUALITY)
    again = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32)
    return np.abs(np.asarray(rgb, dtype=np.float32) - again).mean(axis=2)


# --- the tests ------------------------------------------------------------------------


@pytest.mark.parametrize("query", [False, True])
def test_fingerprints_are_bit_for_bit_those_of_before(query: bool) -> None:
    for photo in _photos():
        new = [(h.kind, h.view, h.mirrored, h.value) for h in fp.fingerprint(photo, query=query)]
        assert new == _old_fingerprint(photo, query)


def test_metadata_hashes_are_those_of_before() -> None:
    for photo in _photos():
        assert hashes(photo) == (_old_phash(photo), _old_dhash(photo)) == (phash(photo), dhash(photo))


def test_error_level_analysis_is_that_of_before() -> None:
    for photo in _photos():
        old = _old_ela_diff(photo)
        h, w = (old.shape[0] // BLOCK) * BLOCK, (old.shape[1] // BLOCK) * BLOCK
        blocks = old[:h, :w].reshape(h // BLOCK, BLOCK, w // BLOCK, BLOCK).mean(axis=(1, 3))
        result = error_level(photo)
        median, top = float(np.median(blocks)), float(np.percentile(blocks, 99.5))
        assert result["median_error"] == round(median, 3) and result["top_error"] == round(top, 3)
        assert result["ratio"] == round(top / max(median, 0.25), 3)


def test_cutout_png_keeps_every_visible_pixel(tmp_path: Path) -> None:
    """Alpha and every visible pixel (alpha > 0) as in the photo; fully transparent pixels
    are stored as (0, 0, 0, 0) since the cutout's own encoder (the photo's colours were
    stored under them before). tests/worker/steps/test_segmentation_overhead.py compares
    whole cutouts with the Pillow-encoded ones."""
    photo = _photos()[0]
    prob = np.zeros((64, 64), dtype=np.float32)
    prob[16:48, 8:56] = 1.0
    mask = Mask(prob, photo.size)
    box = (50, 40, 300, 280)
    artifact = write_cutout(photo, mask, box, tmp_path / "cut.png")
    stored = np.asarray(Image.open(artifact.path))
    expected = np.asarray(photo.crop(box))
    x0, y0, x1, y1 = box
    alpha = np.round(mask.resized(x1 - x0, y1 - y0, (float(x0), float(y0), float(x1), float(y1))) * 255)
    visible = alpha > 0
    assert stored.shape == (240, 250, 4)
    assert 0 < visible.mean() < 1
    assert np.array_equal(stored[..., 3], alpha.astype(np.uint8))
    assert np.array_equal(stored[..., :3][visible], expected[visible])
    assert not stored[~visible].any()


def test_thumbnail_is_within_two_grey_levels_of_the_lanczos_one(tmp_path: Path) -> None:
    for index, photo in enumerate(_photos()):
        photo = photo.convert("RGB").resize((photo.width * 2, photo.height * 2))  # larger than 640
        artifact = write_thumbnail(photo, 640, tmp_path / f"{index}.jpg")
        size = thumbnail_size(photo.size, 640)
        reference = photo.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)
        buf = io.BytesIO()
        reference.save(buf, "JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
        stored = np.asarray(Image.open(artifact.path), dtype=np.int16)
        lanczos = np.asarray(Image.open(buf), dtype=np.int16)
        assert (artifact.width, artifact.height) == size
        assert float(np.abs(stored - lanczos).mean()) < 2.0  # both JPEG q85: most of it is JPEG noise
