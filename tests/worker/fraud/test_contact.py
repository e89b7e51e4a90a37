"""Contact details drawn on a photo are read back (offline PP-OCR) and flagged."""

from __future__ import annotations

from pathlib import Path

import pytest
import skimage.data
from PIL import Image, ImageDraw, ImageFont

from tests.support.fraud import step_context
from worker.config import load_settings
from worker.fraud.contact import OCR_MAX_ASPECT, OCR_MAX_SIDE, ContactInfoStep, PpOcr, find_contacts, ocr_model

pytest.importorskip("rapidocr_onnxruntime")

FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
PHONE, EMAIL = "+44 7911 123456", "deals.shop@gmail.com"


def _photo(with_text: bool) -> Image.Image:
    img = Image.fromarray(skimage.data.coffee()).convert("RGB")
    if with_text:
        if not FONT.exists():
            pytest.skip("DejaVu fonts not installed (apt-get install fonts-dejavu-core)")
        draw = ImageDraw.Draw(img)
        font = ImageFont.truetype(str(FONT), 30)
        draw.text((20, 20), f"Call {PHONE}", font=font, fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
        draw.text((20, 330), EMAIL, font=font, fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
    return img


def _run(img: Image.Image):
    listing = type("Listing", (), {"id": 1, "seller_id": "s"})()
    row = type("Row", (), {"id": 1, "url": "u", "sha256": "x"})()
    return ContactInfoStep().run(step_context(listing, row, b"", img))


def test_phone_and_email_on_photo_are_flagged_with_boxes() -> None:
    result = _run(_photo(with_text=True))
    assert [f.kind for f in result.flags] == ["contact_info"]
    matches = result.flags[0].evidence["matches"]
    found = {(mm["type"], mm["text"]) for mm in matches}
    assert ("phone", "+447911123456") in found
    assert ("email", EMAIL) in found
    phone_box = next(mm["box"] for mm in matches if mm["type"] == "phone")
    assert phone_box[0] < 60 and phone_box[1] < 60 and phone_box[2] > 250  # top-left line


def test_text_on_a_large_photo_maps_back_to_its_pixels() -> None:
    """The OCR reads a copy capped at OCR_MAX_SIDE; boxes come back in the upload's pixels."""
    large = _photo(with_text=True).resize((2400, 1600))  # 4x the coffee photo, over the cap
    result = _run(large)
    phone_box = next(mm["box"] for mm in result.flags[0].evidence["matches"] if mm["type"] == "phone")
    assert phone_box[0] < 240 and phone_box[1] < 240 and phone_box[2] > 1000, phone_box


def test_ocr_is_one_runtime_model_that_never_batches() -> None:
    model = ocr_model(load_settings(device="cpu", batch_max_size=8))
    assert isinstance(model, PpOcr) and not model.batching()  # a pipeline takes one photo at a time
    assert model.load().engine == "rapidocr-onnxruntime"
    prepared = PpOcr().prepare(Image.new("RGB", (6000, 500)))
    height, width, _ = prepared.tensor.shape
    assert width == OCR_MAX_SIDE and width <= OCR_MAX_ASPECT * height  # 2000 x 167 padded to 2000 x 500
    lines = PpOcr().postprocess(
        [[[[10, 20], [110, 20], [110, 40], [10, 40]], "tel 0301234567", 0.9],
         [[[1900, 160], [2000, 160], [2000, 499], [1900, 499]], "pad", 0.5]], prepared.meta)
    assert lines[0].box == pytest.approx((30.0, 60.0, 330.0, 120.0), abs=0.5)
    assert lines[1].box[2:] == (6000.0, 500.0)  # what lies in the padding is clamped to the photo


def test_same_photo_without_text_has_no_flag() -> None:
    result = _run(_photo(with_text=False))
    assert result.flags == []


@pytest.mark.parametrize(("line", "expected"), [
    ("WhatsApp: 0176 2345 6789", {"messenger", "phone"}),
    ("visit www.cheap-phones.shop", {"url"}),
    ("tel. 030/1234567", {"phone"}),
    ("follow @best_deals_shop", {"handle"}),
    ("john(at)yahoo(dot)com", {"email"}),
    ("t.me/cheapdeals", {"messenger"}),
    ("Size 42 EUR 19.99", set()),
    ("2024-11-29", set()),
    ("Model 12345678", set()),
    ("SALE 50% 0FF", set()),
])
def test_detectors(line: str, expected: set[str]) -> None:
    assert {m.type for m in find_contacts(line)} == expected


# --- overhead cuts (issue 14): what the engine is fed is bit-for-bit what it was ---------


@pytest.mark.parametrize("size", [(512, 400), (1225, 816), (301, 1003), (64, 96)])
def test_table_normalise_gives_rapidocr_s_own_bits(size: tuple[int, int]) -> None:
    """The detector input made through the lookup table equals rapidocr's float64
    normalisation, transposed and cast, for every byte value and several photo shapes."""
    import numpy as np
    from rapidocr_onnxruntime.ch_ppocr_det.utils import DetPreProcess

    from worker.fraud.contact import TableDetPreProcess, to_bgr

    rng = np.random.default_rng(sum(size))
    photo = Image.fromarray(skimage.data.astronaut()).resize(size)
    noisy = np.asarray(photo).copy()
    noisy[:16, :16] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)  # every byte somewhere
    bgr = to_bgr(Image.fromarray(noisy))
    assert np.array_equal(bgr, np.ascontiguousarray(noisy[:, :, ::-1]))
    for limit_type in ("min", "max"):
        original = DetPreProcess(736, limit_type, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
        made = TableDetPreProcess.wrap(DetPreProcess(736, limit_type, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]))
        expected, got = original(bgr), made(bgr)
        assert got.dtype == expected.dtype == np.float32 and got.flags.c_contiguous
        assert got.shape == expected.shape and np.array_equal(got, expected)
    odd = DetPreProcess(736, "min", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # per-channel tables
    all_bytes = (np.arange(256 * 3).reshape(16, 48, 1).repeat(3, axis=2) % 256).astype(np.uint8)
    assert np.array_equal(TableDetPreProcess.wrap(odd)(bgr), odd(bgr))
    assert np.array_equal(TableDetPreProcess.wrap(odd)(np.ascontiguousarray(all_bytes)), odd(all_bytes))


def test_the_detector_is_given_the_table_preprocessing() -> None:
    from rapidocr_onnxruntime.ch_ppocr_det.text_detect import TextDetector

    from worker.fraud.contact import TableDetPreProcess, use_table_normalise

    detector = TextDetector.__new__(TextDetector)  # its preprocessing only: no model file
    detector.limit_type, detector.limit_side_len, detector.mean, detector.std = "min", 736, None, None
    use_table_normalise(detector)
    made = detector.get_preprocess(1000)
    assert isinstance(made, TableDetPreProcess) and made.inner.limit_side_len == 736
