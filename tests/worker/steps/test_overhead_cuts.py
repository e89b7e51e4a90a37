"""The overhead cuts of issue 14: what each one keeps equal, and within what tolerance.

Each cut is compared with the computation it replaced, written out here as it was. Exact
equality on real photos: the metadata hashes (one grey conversion for both), the arithmetic of
error-level analysis (integer block sums) and the cutout PNG (a faster zlib level, same
pixels). Within a stated tolerance, each with a step version bump:

* the duplicate fingerprints (duplicates@2: views cut from a 256 px grey working copy instead
  of a 512 px RGB thumbnail): a few bits of 128 per view from the @1 values, and an index of
  @1 hashes still matches @2 queries of edited copies under the default distance;
* error-level analysis on the shared bilinear 1024 px copy (tamper@2; @1 made its own Lanczos
  copy): the same figures for photos up to 1024 px, the ratio within 15 % above;
* the Laplacian variance of the grey copy shrunk to 512 px (quality@2, Pillow's bilinear by
  torch's uint8 kernel, within a grey level; @1 shrank the RGB photo with Pillow, then
  converted it): rounding noise only, within 10 % and the same blur decision.

The thumbnail (a picture for people, analysed by nothing) moved from Lanczos to bicubic
resampling: about half a grey level apart on average before the JPEG encoding, under two
after it (checked below).
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageOps

from worker.config import load_settings
from worker.fraud import fingerprint as fp
from worker.fraud.duplicates import best_match
from worker.fraud.quality import ANALYSIS_SIDE, analysis_pixels, laplacian_variance
from worker.fraud.tamper import BLOCK, ELA_MAX_SIDE, ELA_QUALITY, ela_copy, error_level
from worker.io.hashing import _dct_matrix, dhash, hashes, phash
from worker.models.common import fit_within
from worker.pipeline.contract import ImageContext
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


OLD_WORKING_SIDE = 512  # duplicates@1: an RGB Lanczos thumbnail, then one crop per view


def _old_views(image: Image.Image, query: bool) -> dict[str, Image.Image]:
    image = image.convert("RGB")
    if max(image.size) > OLD_WORKING_SIDE:
        image = image.copy()
        image.thumbnail((OLD_WORKING_SIDE, OLD_WORKING_SIDE), Image.Resampling.LANCZOS)
    out = {"full": image}
    trimmed = fp.trim_borders(image)
    if trimmed.size != image.size:
        out["trim"] = trimmed
    whole = (0, 0, *trimmed.size)
    for keep in fp.CENTRE_CROPS:
        out[f"c{round(keep * 100)}"] = trimmed.crop(fp.centre_box(whole, keep))
    out.update({k: trimmed.crop(b) for k, b in fp.anchored_boxes(whole, fp.ANCHORED_CUT, "cut_").items()})
    if query:
        for keep in fp.QUERY_CENTRE_CROPS:
            out[f"qc{round(keep * 100)}"] = trimmed.crop(fp.centre_box(whole, keep))
        out.update({k: trimmed.crop(b) for k, b in fp.anchored_boxes(whole, fp.QUERY_CUT, "qcut_").items()})
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


def _by_key(hashes: list[tuple[str, str, bool, int]]) -> dict[tuple[str, str, bool], int]:
    return {(kind, view, mirrored): value for kind, view, mirrored, value in hashes}


@pytest.mark.parametrize("query", [False, True])
def test_fingerprints_are_within_a_few_bits_of_those_of_before(query: bool) -> None:
    for photo in _photos():
        old = _by_key(_old_fingerprint(photo, query))
        new = _by_key([(h.kind, h.view, h.mirrored, h.value) for h in fp.fingerprint(photo, query=query)])
        assert list(new) == list(old)  # the same views, kinds and order
        per_view: dict[tuple[str, bool], int] = {}
        for (kind, view, mirrored), value in old.items():
            bits = (value ^ new[(kind, view, mirrored)]).bit_count()
            per_view[(view, mirrored)] = per_view.get((view, mirrored), 0) + bits
        assert per_view[("full", False)] <= 2  # pHash + dHash bits of 128
        assert max(per_view.values()) <= 8
        assert sum(per_view.values()) / len(per_view) <= 2.0


def _edits(photo: Image.Image) -> list[Image.Image]:
    w, h = photo.size
    return [photo.resize((w // 2, h // 2), Image.Resampling.BILINEAR),
            ImageOps.mirror(photo),
            photo.crop((round(w * 0.15), 0, w, h)),  # 15 % cut from one side
            photo.crop((round(w * 0.075), round(h * 0.075), round(w * 0.925), round(h * 0.925))),
            ImageOps.expand(photo, border=(w // 10, h // 10), fill=(255, 255, 255)),
            Image.open(io.BytesIO(_jpeg_bytes(photo, 30))).convert("RGB")]


def _jpeg_bytes(photo: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_an_index_of_the_hashes_of_before_matches_new_queries() -> None:
    """Photos stored by duplicates@1 keep being found by duplicates@2 queries until they are
    analysed again: every edited copy is within the default distance of its stored original."""
    limit = load_settings().duplicate_max_distance
    for photo in _photos()[::2]:  # coffee, and coffee in a frame (a trim view)
        stored: dict[str, dict[str, int]] = {}
        for kind, view, _mirrored, value in _old_fingerprint(photo, query=False):
            stored.setdefault(view, {})[kind] = value
        for copy in _edits(photo):
            match = best_match(fp.fingerprint(copy, query=True), stored)
            assert match is not None and match.distance <= limit - 4


def test_lanczos_weights_are_pillows() -> None:
    """The weight matrices resample like Pillow's Lanczos filter (measured on a float image,
    where Pillow does not round): shrinking, enlarging and odd sizes."""
    for in_size, out_size in ((256, 32), (171, 32), (218, 9), (100, 8), (20, 32), (7, 9), (33, 32)):
        impulses = Image.fromarray(np.eye(in_size, dtype=np.float32))  # row j: a 1 at column j
        pillow = np.asarray(impulses.resize((out_size, in_size), Image.Resampling.LANCZOS))
        assert np.allclose(pillow.T, fp.lanczos_weights(in_size, out_size), rtol=0, atol=1e-6)


def test_flat_views_have_no_gradient_bits() -> None:
    """Resampled views are rounded to whole grey levels: a flat area compares equal, as it did
    in 8-bit images, instead of giving bits from floating-point noise."""
    flat = Image.new("RGB", (900, 600), (200, 200, 200))
    assert {h.value for h in fp.fingerprint(flat, query=True) if h.kind == "dhash"} == {0}


def test_the_working_copy_and_boxes_are_the_views() -> None:
    photo = _photos()[2]  # framed: has a trim view
    working = fp.working_copy(photo)
    assert max(working.size) == fp.WORKING_SIDE and working.mode == "L"
    boxes = fp.view_boxes(working, query=True)
    assert "trim" in boxes and boxes["full"] == (0, 0, *working.size)
    views = fp.views(photo, query=True)
    assert {name: img.size for name, img in views.items()} == {
        name: (x1 - x0, y1 - y0) for name, (x0, y0, x1, y1) in boxes.items()}
    grey = photo.convert("L")  # the step hands over the shared grey copy: the same hashes
    assert fp.fingerprint(grey, query=True) == fp.fingerprint(photo, query=True)


def test_metadata_hashes_are_those_of_before() -> None:
    for photo in _photos():
        assert hashes(photo) == (_old_phash(photo), _old_dhash(photo)) == (phash(photo), dhash(photo))


def test_error_level_arithmetic_is_that_of_before() -> None:
    """On the same (Lanczos) copy as before, the integer block sums give the figures the float
    differences gave."""
    for photo in _photos():
        old = _old_ela_diff(photo)
        h, w = (old.shape[0] // BLOCK) * BLOCK, (old.shape[1] // BLOCK) * BLOCK
        blocks = old[:h, :w].reshape(h // BLOCK, BLOCK, w // BLOCK, BLOCK).mean(axis=(1, 3))
        lanczos, _ = fit_within(photo.convert("RGB"), ELA_MAX_SIDE, Image.Resampling.LANCZOS)
        result = error_level(photo, lanczos)
        median, top = float(np.median(blocks)), float(np.percentile(blocks, 99.5))
        assert result["median_error"] == round(median, 3) and result["top_error"] == round(top, 3)
        assert result["ratio"] == round(top / max(median, 0.25), 3)


def test_error_level_on_the_shared_reduced_copy() -> None:
    """tamper@2 measures on ``ctx.reduced(ELA_MAX_SIDE)`` (Pillow's bilinear, shared with
    segmentation) instead of its own Lanczos copy: the same figures for photos that fit, the
    ratio within 15 % for larger ones."""
    for photo in _photos():
        photo = photo.convert("RGB")
        ctx = ImageContext(image_id=1, listing_id=1, seller_id="s", category=None, url="u", image=photo,
                           raw=b"", source_format="JPEG", sha256="x", settings=load_settings())
        shared = ctx.reduced(ELA_MAX_SIDE)[0]
        assert np.array_equal(np.asarray(ela_copy(photo)), np.asarray(shared))
        lanczos, _ = fit_within(photo, ELA_MAX_SIDE, Image.Resampling.LANCZOS)
        before, now = error_level(photo, lanczos), error_level(photo, shared)
        if max(photo.size) <= ELA_MAX_SIDE:
            assert now == before
        else:
            assert abs(now["ratio"] / before["ratio"] - 1) <= 0.15


def _kornia_laplacian_variance(grey: Image.Image) -> float:
    import kornia
    import torch

    with torch.inference_mode():
        t = torch.from_numpy(np.asarray(grey, dtype=np.float32))[None, None]
        filtered = kornia.filters.laplacian(t, kernel_size=3, border_type="reflect", normalized=False)
        return float(filtered[..., 1:-1, 1:-1].var())


def _blurred(photo: Image.Image) -> list[Image.Image]:
    from PIL import ImageFilter

    return [photo] + [photo.filter(ImageFilter.GaussianBlur(r * max(photo.size) / 512)) for r in (1, 3)]


def test_laplacian_variance_is_kornias_on_the_same_pixels() -> None:
    for photo in _photos()[1:3]:
        for image in _blurred(photo)[:2]:
            scale = ANALYSIS_SIDE / max(image.size)
            grey = image.convert("L").resize((round(image.width * scale), round(image.height * scale)),
                                             Image.Resampling.BILINEAR)
            assert laplacian_variance(grey) == pytest.approx(_kornia_laplacian_variance(grey), rel=1e-5)


def test_analysis_pixels_are_pillows_bilinear_within_a_grey_level() -> None:
    for photo in _photos():
        grey = photo.convert("L")
        scale = ANALYSIS_SIDE / max(grey.size)
        size = (round(grey.width * scale), round(grey.height * scale))
        pillow = np.asarray(grey.resize(size, Image.Resampling.BILINEAR) if scale < 1 else grey, dtype=np.int32)
        pixels = analysis_pixels(photo)  # torch is imported here: its uint8 kernel
        assert pixels is not None and pixels.shape == pillow.shape
        assert np.abs(pixels - pillow).max() <= 1


def test_quality_does_not_import_torch() -> None:
    """Without a model step nothing imports torch: quality then shrinks with Pillow itself."""
    code = ("import sys, numpy as np; from PIL import Image; from worker.fraud.quality import laplacian_variance; "
            "v = laplacian_variance(Image.fromarray(np.random.default_rng(0).integers(0, 256, (900, 700), "
            "dtype=np.uint8))); assert v is not None and 'torch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[3])


def test_laplacian_variance_of_the_grey_copy_is_near_that_of_before() -> None:
    """quality@2 shrinks the grey copy (quality@1 shrank the RGB photo, then converted it): the
    figure moves by rounding noise only, and the blur decision stays."""
    threshold = load_settings().quality_blur_threshold
    for photo in _photos()[:3]:  # larger than 512 px: shrunk
        for image in _blurred(photo):
            scale = ANALYSIS_SIDE / max(image.size)
            before = _kornia_laplacian_variance(
                image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.Resampling.BILINEAR).convert("L"))
            now = laplacian_variance(image.convert("L"))
            assert now is not None and now == pytest.approx(before, rel=0.1)
            assert (now < threshold) == (before < threshold)


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


# --- issue 14, round 3: metadata hashes through matrix products ---------------------------


def test_lanczos_grey_is_pillow_s_resize_bit_for_bit() -> None:
    """worker.io.lanczos reproduces Image.resize(size, LANCZOS) of an 8-bit grey image exactly
    (coefficients, rounding, the order of the two passes), on odd, tiny, enlarged and strip
    shapes, and several output sizes sharing one pass."""
    from worker.io.lanczos import lanczos_grey

    rng = np.random.default_rng(14)
    noise = Image.fromarray(rng.integers(0, 256, (900, 900), dtype=np.uint8))
    images = [photo.convert("L") for photo in _photos()]
    images += [images[1].resize(size) for size in ((1225, 816), (816, 1225), (2, 2000), (2000, 3), (48, 78), (1, 1))]
    images += [noise.crop((0, 0, int(rng.integers(1, 900)), int(rng.integers(1, 900)))) for _ in range(12)]
    for image in images:
        width, height = image.size
        for sizes in ([(32, 32), (9, 8)], [(width, 8)], [(9, height)], [(64, 64), (width * 2, height + 3)],
                      [(int(rng.integers(1, 120)), int(rng.integers(1, 120)))]):
            for size, got in zip(sizes, lanczos_grey(image, sizes), strict=True):
                assert np.array_equal(got, np.asarray(image.resize(size, Image.Resampling.LANCZOS))), (image.size, size)


def test_metadata_photo_hashes_are_those_of_hashes() -> None:
    from worker.steps.metadata import photo_hashes

    rng = np.random.default_rng(7)
    photos = [photo.convert("RGB") for photo in _photos()]
    photos += [photos[1].resize(size) for size in ((1225, 816), (816, 1225), (4000, 3000), (31, 33), (3, 700))]
    photos += [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))]
    for photo in photos:
        grey = photo.convert("L")
        assert photo_hashes(grey) == hashes(grey) == hashes(photo), photo.size


def test_resample_uint8_is_pillow_s_filter_up_to_rounding() -> None:
    """worker.models.common.resample_uint8 (the thumbnail, tagging, detection and NSFW inputs):
    Pillow's antialiased bilinear / bicubic by torch's uint8 kernels when both sides shrink
    (a grey level on ~0.1-0.5 % of the pixels, up to 4 levels at slight reductions such as
    512 -> 416 px; under 0.05 levels on average), Pillow itself when
    a side is enlarged; tensor_image gives the tensor's pixels back as an RGB image."""
    from worker.models.common import resample_uint8, tensor_image

    filters = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
    for photo in (p.convert("RGB") for p in _photos()):
        big = photo.resize((1225, 816), Image.Resampling.BICUBIC)
        for image, size in ((big, (640, 426)), (big, (256, 256)), (big, (416, 277)), (big, (384, 256)),
                            (photo, (224, 224)), (photo, (30, 20)), (photo, (900, 700))):
            for mode, pillow_filter in filters.items():
                made = tensor_image(resample_uint8(image, size, mode))
                expected = np.asarray(image.resize(size, pillow_filter), dtype=np.int16)
                apart = np.abs(np.asarray(made, dtype=np.int16) - expected)
                assert made.size == size and apart.max() <= 4 and apart.mean() < 0.05, (image.size, size, mode)
                if size[0] > image.width or size[1] > image.height:
                    assert apart.max() == 0  # enlarging: Pillow's own resize
    box = (10, 20, 300, 250)
    cropped = resample_uint8(_photos()[0], (100, 80), "bicubic", box=box)
    assert np.array_equal(np.asarray(tensor_image(cropped)),
                          np.asarray(tensor_image(resample_uint8(_photos()[0].crop(box), (100, 80), "bicubic"))))
