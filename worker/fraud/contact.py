"""Contact details written on a product photo (step ``contact_info``).

Sellers who want to take the sale off the platform print a phone number, an e-mail address,
a web address or a messenger handle on their pictures. The text is read with the offline
PP-OCRv4 models that ship inside ``rapidocr-onnxruntime`` (no download), then plain rules
find the contact details in it. Each finding keeps the text as read and its box, so a
reviewer sees exactly what was found where.

The OCR runs as a model of the shared runtime (:class:`PpOcr`: onnxruntime underneath on the
CPU, the same three graphs on torch on CUDA, ``CATALOG_ONNX_BACKEND``);
the step's version is ``contact@<rules>:pp-ocrv4@<digest of the three graph files>``.

Weak spots: stylised or very small text is missed by the OCR; an obfuscated address
("name at gmail dot com") is only caught in its most common spellings; a manufacturer's
hotline printed on a box is a true detection but not fraud (reviewers dismiss it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from worker.config import Settings
from worker.models.backends import Backend, PipelineBackend, TorchBackend, onnx_to_torch
from worker.models.common import fit_within, package_file, pad_to_aspect, rgb
from worker.models.runtime import ModelUnavailable, Prepared, VisionModel, model_for
from worker.pipeline.contract import Flag, ImageContext, StepResult

# --- detectors (pure functions, testable without OCR) ----------------------------------

_EMAIL = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9._%+\-]*\s?(?:@|\(at\)|\[at\]|\sat\s)\s?"
    r"[A-Za-z0-9\-]+(?:\s?(?:\.|\(dot\)|\[dot\]|\sdot\s)\s?[A-Za-z0-9\-]+)*"
    r"\s?(?:\.|\(dot\)|\[dot\]|\sdot\s)\s?[A-Za-z]{2,10}\b",
    re.IGNORECASE,
)
_URL = re.compile(
    r"\b(?:https?://|www\.)[^\s,;]+"
    r"|\b[A-Za-z0-9][A-Za-z0-9\-]{1,62}\.(?:com|net|org|shop|store|online|site|biz|info|io|co|me|"
    r"ly|link|top|xyz|ru|cn|de|uk|fr|es|it|nl|pl|in|br|tk)\b(?:/[^\s,;]*)?",
    re.IGNORECASE,
)
# Digits with the usual separators; the digit count is checked afterwards.
_PHONE = re.compile(r"(?:\+|\b00)?\(?\d[\d\s().\-/]{5,22}\d\b")
_MESSENGERS = (
    ("whatsapp", r"whats\s?app|wh?atsap|\bwa\.me\b|\bwa\s*:"),
    ("telegram", r"telegram|\bt\.me\b|\btg\s*:"),
    ("wechat", r"we\s?chat|weixin|微信|\bwx\s*:"),
    ("line", r"\bline\s*(?:id)?\s*:"),
    ("viber", r"viber"),
    ("signal", r"\bsignal\s*:"),
    ("skype", r"skype"),
    ("instagram", r"instagram|\big\s*:"),
    ("snapchat", r"snapchat|\bsnap\s*:"),
    ("qq", r"\bqq\s*[:：]"),
)
_MESSENGER_RES = [(name, re.compile(pattern, re.IGNORECASE)) for name, pattern in _MESSENGERS]
_HANDLE = re.compile(r"(?<![\w.@])@[A-Za-z][A-Za-z0-9_.]{3,31}\b")
# OCR reads digits as look-alike letters inside numbers.
_LOOKALIKES = str.maketrans({"O": "0", "o": "0", "D": "0", "l": "1", "I": "1", "|": "1", "S": "5",
                             "B": "8", "Z": "2"})
_DIGITISH = re.compile(r"[+(]?\d[\dOolI|SBZD\s().\-/]{5,24}[\dOolI|SBZD]")
_PHONE_WORDS = re.compile(r"\b(?:tel|telefon|phone|call|mobile|mob|cell|contact|whats\s?app|viber|"
                          r"telegram|signal|sms|text|hotline|ph)\b|☎|📞", re.IGNORECASE)


@dataclass(frozen=True)
class ContactMatch:
    type: str  # phone | email | url | messenger | handle
    text: str  # as found (normalised for phones)
    source: str  # the OCR line it came from

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "text": self.text, "line": self.source}


def _normalise_phone(candidate: str) -> str | None:
    digits = re.sub(r"\D", "", candidate)
    if not 7 <= len(digits) <= 15:
        return None
    if len(set(digits)) <= 2:  # 0000000, 1111111: not a number anyone would call
        return None
    # Dates, prices and sizes look like digit runs too: require phone-like grouping.
    if re.fullmatch(r"\d{1,4}[./-]\d{1,2}[./-]\d{2,4}", candidate.strip()):
        return None
    return ("+" if candidate.strip().startswith(("+", "00")) else "") + digits


def find_contacts(line: str) -> list[ContactMatch]:
    """All contact details in one line of text."""
    found: list[ContactMatch] = []
    taken: list[tuple[int, int]] = []

    def add(kind: str, text: str, span: tuple[int, int]) -> None:
        if any(span[0] < end and start < span[1] for start, end in taken):
            return
        taken.append(span)
        found.append(ContactMatch(kind, text, line))

    for mo in _EMAIL.finditer(line):
        text = mo.group(0)
        if "@" in text or re.search(r"\(at\)|\[at\]|\sat\s", text, re.IGNORECASE):
            add("email", re.sub(r"\s+", "", text), mo.span())
    for mo in _URL.finditer(line):
        add("url", mo.group(0).rstrip(".)"), mo.span())
    for _name, rx in _MESSENGER_RES:
        said = rx.search(line)
        if said:
            found.append(ContactMatch("messenger", line[said.start():].strip(), line))
    for mo in _HANDLE.finditer(line):
        add("handle", mo.group(0), mo.span())
    for mo in _DIGITISH.finditer(line):
        candidate = mo.group(0)
        if sum(ch.isdigit() for ch in candidate) < 5:
            continue  # mostly letters: a word, not a number read badly
        fixed = candidate.translate(_LOOKALIKES)
        if not _PHONE.fullmatch(fixed.strip()) and not _PHONE.search(fixed):
            continue
        phone = _normalise_phone(fixed)
        bare = not re.search(r"[\s().\-/+]", fixed.strip())
        if phone and bare and len(phone) < 10 and not _PHONE_WORDS.search(line):
            continue  # "Model 12345678": an unseparated short number needs a phone word nearby
        if phone:
            add("phone", phone, mo.span())
    return found


# --- OCR --------------------------------------------------------------------------------


@dataclass(frozen=True)
class OcrLine:
    text: str
    confidence: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1


OCR_NEEDS = ("OCR needs rapidocr-onnxruntime==1.4.4 (installed with --no-deps, plus onnxruntime, "
             "pyclipper, shapely, PyYAML)")
OCR_MAX_SIDE = 2000  # rapidocr's own max_side_len: reducing first bounds what it is handed
# rapidocr scales the SHORTER side up (to 30 px, then its detector to 736 px): a 1 x 2000
# strip would become a 736 x ~1,400,000 px input (4 GB as float32). Thinner inputs are padded
# to this aspect ratio (no text can be read in a few pixels anyway), so the detector's input
# stays at most ~2,950 x 736 px.
OCR_MAX_ASPECT = 4.0


def ocr_files() -> list[Path]:
    """PP-OCRv4 detection, direction classifier and recognition graphs, as shipped inside
    ``rapidocr-onnxruntime`` (found without importing it: its import loads OpenCV)."""
    names = ("ch_PP-OCRv4_det_infer.onnx", "ch_ppocr_mobile_v2.0_cls_infer.onnx", "ch_PP-OCRv4_rec_infer.onnx")
    try:
        return [package_file("rapidocr_onnxruntime", "models", name) for name in names]
    except ModelUnavailable as exc:
        raise ModelUnavailable(f"{OCR_NEEDS}: {exc}") from None


class PpOcr(VisionModel[list[OcrLine]]):
    """PP-OCRv4 through rapidocr-onnxruntime's pipeline (detect -> angle -> recognise on
    variable-sized crops: it takes one photo at a time, so it never batches). Its three
    onnxruntime sessions get the runtime's device and thread settings
    (``CATALOG_TORCH_THREADS``, default 2 intra-op threads). Result: the text lines with
    boxes in the photo's pixels."""

    name = "pp-ocrv4"

    def weights(self) -> Sequence[Path]:
        return ocr_files()

    def _build(self) -> Backend:
        try:
            import onnxruntime as ort
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as exc:
            raise ModelUnavailable(f"{OCR_NEEDS}: {exc}") from None
        det, cls, rec = self.weights()
        on_torch = self.onnx_engine == "torch"
        cuda = (not on_torch and self.device.type == "cuda"
                and "CUDAExecutionProvider" in ort.get_available_providers())
        engine = RapidOCR(
            intra_op_num_threads=self.torch_threads or 2, inter_op_num_threads=1,
            det_model_path=str(det), cls_model_path=str(cls), rec_model_path=str(rec),
            det_use_cuda=cuda, cls_use_cuda=cuda, rec_use_cuda=cuda,
        )
        use_table_normalise(engine.text_det)
        if on_torch:
            # rapidocr keeps its pre- and post-processing; its three graphs run on torch (the
            # CUDA path, CATALOG_ONNX_BACKEND): same graphs, same outputs within 1e-4.
            engine.text_det.infer = _TorchGraph(TorchBackend(onnx_to_torch(det), self.device, self.autocast_dtype))
            engine.text_cls.infer = _TorchGraph(TorchBackend(onnx_to_torch(cls), self.device, self.autocast_dtype))
            engine.text_rec.session = _TorchGraph(TorchBackend(onnx_to_torch(rec), self.device,
                                                               self.autocast_dtype))
            return PipelineBackend(lambda bgr: engine(bgr)[0], self.device, engine="rapidocr-torch")
        device = torch.device("cuda" if cuda else "cpu")
        return PipelineBackend(lambda bgr: engine(bgr)[0], device, engine="rapidocr-onnxruntime")

    def prepare(self, image: Image.Image) -> Prepared:
        bounded, scale = fit_within(rgb(image), OCR_MAX_SIDE)
        padded = pad_to_aspect(bounded, OCR_MAX_ASPECT)
        return Prepared(to_bgr(padded), {"scale": scale, "size": image.size})

    def collate(self, tensors: list[Any]) -> Any:
        return list(tensors)

    def split(self, output: Any, count: int) -> list[Any]:
        return list(output)

    def postprocess(self, output: Any, meta: dict[str, Any]) -> list[OcrLine]:
        sx, sy = meta["scale"]
        width, height = meta["size"]
        lines = []
        for points, text, score in output or []:
            pts = np.asarray(points, dtype=np.float32)
            xs, ys = pts[:, 0] / sx, pts[:, 1] / sy
            lines.append(OcrLine(str(text), float(score), (
                float(np.clip(xs.min(), 0, width)), float(np.clip(ys.min(), 0, height)),
                float(np.clip(xs.max(), 0, width)), float(np.clip(ys.max(), 0, height)))))
        return lines


def to_bgr(image: Image.Image) -> np.ndarray:
    """An RGB image as the contiguous BGR array the engine expects: OpenCV's SIMD channel
    swap (the same bytes as ``np.asarray(image)[:, :, ::-1]`` copied, ~30x faster)."""
    import cv2  # rapidocr's own dependency; imported here so that importing this module stays light

    return cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR)


def use_table_normalise(detector: Any) -> None:
    """Make rapidocr's text detector normalise its input through a 256-entry table.

    rapidocr's ``DetPreProcess.normalize`` computes ``(x * (1/255) - mean) / std`` over the
    whole detector input in float64 (its mean and std are float64 arrays), then transposes
    and copies to float32: ~20 ms per 1 MP photo, most of contact_info's non-model time. Every
    output value depends only on the byte and the channel, so :class:`TableDetPreProcess`
    looks the float32 results up (a table made by the very same expression), channel plane by
    channel plane straight into the (1, C, H, W) input: the same bits, ~1.5 ms."""
    from rapidocr_onnxruntime.ch_ppocr_det.utils import DetPreProcess

    original = detector.get_preprocess

    def get_preprocess(max_wh: int) -> Any:
        made = original(max_wh)
        return TableDetPreProcess.wrap(made) if isinstance(made, DetPreProcess) else made

    detector.get_preprocess = get_preprocess


class TableDetPreProcess:
    """rapidocr's ``DetPreProcess`` (same resize, same output bits) with a table lookup for
    the normalisation; see :func:`use_table_normalise`."""

    def __init__(self, inner: Any, tables: np.ndarray) -> None:
        self.inner = inner
        self.tables = tables  # (C, 256) float32

    @classmethod
    def wrap(cls, inner: Any) -> Any:
        mean, std = np.asarray(inner.mean), np.asarray(inner.std)
        if mean.shape != std.shape or mean.ndim != 1:
            return inner  # a layout the table does not cover: rapidocr's own code
        values = np.arange(256, dtype=np.uint8).reshape(256, 1, 1).repeat(mean.shape[0], axis=2)
        tables = np.asarray(inner.normalize(values), dtype=np.float32).reshape(256, -1).T  # its own arithmetic
        return cls(inner, np.ascontiguousarray(tables))

    def __call__(self, img: np.ndarray) -> np.ndarray | None:
        import cv2

        if img.ndim != 3 or img.shape[2] != self.tables.shape[0] or img.dtype != np.uint8:
            return self.inner(img)
        resized = self.inner.resize(img)
        if resized is None:
            return None
        out = np.empty((1, resized.shape[2], resized.shape[0], resized.shape[1]), dtype=np.float32)
        for channel, plane in enumerate(cv2.split(resized)):
            target = out[0, channel]
            written = cv2.LUT(plane, self.tables[channel], dst=target)
            if not np.shares_memory(written, target):  # OpenCV allocated its own: copy it over
                target[...] = written
        return out


class _TorchGraph:
    """Stands in for one of rapidocr's onnxruntime sessions: ``graph(x) -> [y]`` on numpy."""

    def __init__(self, backend: TorchBackend) -> None:
        self.backend = backend

    def __call__(self, array: np.ndarray) -> list[np.ndarray]:
        return [self.backend.forward(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))).numpy()]


def ocr_model(settings: Settings) -> PpOcr:
    """The process-wide OCR for these settings (registry; loads on first prediction)."""
    return model_for(settings, ("ocr",), PpOcr)


def _rows(lines: list[OcrLine]) -> list[list[OcrLine]]:
    """Group OCR boxes that sit on one text row (a number split into two boxes)."""
    rows: list[list[OcrLine]] = []
    for line in sorted(lines, key=lambda ln: (ln.box[1], ln.box[0])):
        cy = (line.box[1] + line.box[3]) / 2
        for row in rows:
            ref = row[-1]
            h = ref.box[3] - ref.box[1]
            if abs((ref.box[1] + ref.box[3]) / 2 - cy) < h * 0.5 and line.box[0] - ref.box[2] < h * 2:
                row.append(line)
                break
        else:
            rows.append([line])
    return rows


class ContactInfoStep:
    name: ClassVar[str] = "contact_info"
    requires: ClassVar[tuple[str, ...]] = ()
    RULES: ClassVar[str] = "contact@1"  # bump when the detectors above change

    def version(self, settings: Settings) -> str:
        """The rules' version and the OCR model's (its weight files' digest)."""
        return f"{self.RULES}:{ocr_model(settings).version}"

    def run(self, ctx: ImageContext) -> StepResult:
        model = ocr_model(ctx.settings)
        lines = [ln for ln in model.infer(ctx.image) if ln.confidence >= ctx.settings.contact_min_confidence]
        matches: list[dict[str, Any]] = []
        seen: set[tuple[str, str]] = set()
        for row in _rows(lines):
            candidates = [[ln] for ln in row]
            if len(row) > 1:
                candidates.append(row)  # also the joined row: "+44 7911" "123456"
            for group in candidates:
                text = " ".join(ln.text for ln in group)
                for found in find_contacts(text):
                    key = (found.type, found.text)
                    if key in seen:
                        continue
                    seen.add(key)
                    box = (min(ln.box[0] for ln in group), min(ln.box[1] for ln in group),
                           max(ln.box[2] for ln in group), max(ln.box[3] for ln in group))
                    matches.append({**found.to_dict(), "box": [round(v, 1) for v in box],
                                    "confidence": round(min(ln.confidence for ln in group), 3)})
        data = {"text": [ln.text for ln in lines], "matches": len(matches), "engine": model.loaded_engine}
        if not matches:
            return StepResult(data=data)
        kinds = sorted({mm["type"] for mm in matches})
        score = min(1.0, max(mm["confidence"] for mm in matches) * (0.8 + 0.1 * len(kinds)))
        evidence = {
            "matches": matches,
            "summary": "Contact details are written on the photo: " + "; ".join(
                f"{mm['type']} {mm['text']!r}" for mm in matches[:6]) + ".",
        }
        return StepResult(flags=[Flag("contact_info", round(score, 3), evidence)], data=data)
