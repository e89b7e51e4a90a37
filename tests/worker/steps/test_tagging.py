"""Tagging step on real photos with the shipped EfficientNet-Lite0 weights (no download)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from worker.config import Settings, load_settings
from worker.pipeline.contract import ImageContext
from worker.steps.tagging import (
    EfficientNetLite0,
    TaggingStep,
    Taxonomy,
    imagenet_classes,
    tagging_model,
)

CAT_LABELS = {"tiger cat", "tabby", "Egyptian cat", "Persian cat", "Siamese cat"}


def make_ctx(image: Image.Image, settings: Settings, image_id: int = 1) -> ImageContext:
    return ImageContext(
        image_id=image_id, listing_id=1, seller_id="s", category=None, url="file://x",
        image=image, raw=b"", source_format="PNG", sha256="0" * 64, settings=settings,
    )


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return load_settings(device="cpu", data_dir=tmp_path_factory.mktemp("tagging"), batch_max_size=1)


@pytest.fixture(scope="module")
def step() -> TaggingStep:
    return TaggingStep()


@pytest.fixture(scope="module")
def model(settings: Settings) -> EfficientNetLite0:
    model = tagging_model(settings)
    assert isinstance(model, EfficientNetLite0)
    return model


@pytest.fixture(scope="module")
def coffee() -> Image.Image:
    return Image.fromarray(data.coffee())


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    return Image.fromarray(data.chelsea())


def test_coffee_is_kitchenware_with_a_cup_label(step: TaggingStep, settings: Settings, coffee: Image.Image) -> None:
    result = step.run(make_ctx(coffee, settings))
    labels = {tag.name for tag in result.tags if tag.source == "imagenet"}
    assert labels & {"espresso", "cup", "coffee mug"}, labels
    assert result.data["category"]["name"] == "kitchenware"
    assert result.data["category"]["score"] > 0.5 and result.data["category"]["confident"]
    assert any(t.name == "kitchenware" and t.source == "category-map" for t in result.tags)


def test_chelsea_gets_a_cat_label(step: TaggingStep, settings: Settings, chelsea: Image.Image) -> None:
    result = step.run(make_ctx(chelsea, settings))
    labels = [tag.name for tag in result.tags if tag.source == "imagenet"]
    assert labels[0] in CAT_LABELS, labels
    assert not result.data["category"]["confident"]  # no catalog category for a cat photo


def test_embedding_is_normalised_and_meaningful(model: EfficientNetLite0, coffee: Image.Image,
                                                chelsea: Image.Image) -> None:
    width, height = coffee.size
    variant = coffee.transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop((20, 10, width - 30, height - 20))
    a, b, c = (model.predict(image).embedding for image in (coffee, variant, chelsea))
    assert a.shape == (1280,) and a.dtype == np.float32
    assert np.linalg.norm(a) == pytest.approx(1.0, abs=1e-5)
    assert float(a @ b) > 0.85  # same photo, flipped and cropped
    assert float(a @ c) < 0.4  # coffee vs cat


def test_batch_equals_one_by_one_for_different_sizes(model: EfficientNetLite0, coffee: Image.Image,
                                                     chelsea: Image.Image) -> None:
    images = [coffee, chelsea.resize((301, 187)), Image.fromarray(data.astronaut()).resize((150, 260))]
    batched = model.predict_batch(images)
    for image, together in zip(images, batched, strict=True):
        alone = model.predict(image)
        np.testing.assert_allclose(together.embedding, alone.embedding, atol=1e-5)
        torch.testing.assert_close(together.probs, alone.probs, atol=1e-5, rtol=1e-4)


def test_prepare_resamples_only_the_eval_crop(model: EfficientNetLite0, coffee: Image.Image) -> None:
    """Same input as "resize the short side to 256, centre-crop 224" (the model's eval
    transform), computed without the resized image: a 1x20000 strip made that 3.9 GB."""
    def resize_then_crop(image: Image.Image) -> torch.Tensor:
        width, height = image.size
        scale = 256 / min(width, height)
        new_w, new_h = max(224, round(width * scale)), max(224, round(height * scale))
        resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - 224) // 2, (new_h - 224) // 2
        crop = resized.crop((left, top, left + 224, top + 224))
        return torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0

    for image in (coffee, coffee.resize((1500, 1000)), coffee.resize((301, 187)), coffee.resize((90, 700))):
        diff = (model.prepare(image).tensor - resize_then_crop(image)).abs() * 127.5
        # Pillow's fixed-point filter coefficients round differently for a sub-box: a few
        # levels on single pixels when upsampling, nothing on average.
        assert float(diff.mean()) < 0.2 and float(diff.max()) <= 8.01, (image.size, float(diff.max()))
    assert model.prepare(Image.new("RGB", (1, 20000))).tensor.shape == (3, 224, 224)


def test_version_names_model_and_weights(step: TaggingStep, settings: Settings) -> None:
    assert step.version(settings) == "efficientnet-lite0-imagenet@57934424"


def test_taxonomy_file_is_valid_and_checked(tmp_path: Path) -> None:
    taxonomy = Taxonomy.load()
    assert len(taxonomy.names) >= 30 and "kitchenware" in taxonomy.names
    assert taxonomy.matrix.shape == (len(taxonomy.names), len(imagenet_classes()))
    bad = tmp_path / "taxonomy.yaml"
    bad.write_text("categories:\n  mugs: [coffee mug, no such class]\n")
    with pytest.raises(ValueError, match="no such class"):
        Taxonomy.load(bad)


def test_trained_category_head_replaces_the_map(tmp_path: Path, model: EfficientNetLite0, coffee: Image.Image,
                                                chelsea: Image.Image) -> None:
    coffee_vec = torch.from_numpy(model.predict(coffee).embedding)
    cat_vec = torch.from_numpy(model.predict(chelsea).embedding)
    head = torch.nn.Linear(1280, 3)
    with torch.no_grad():
        head.weight.copy_(torch.stack([coffee_vec, cat_vec, torch.zeros(1280)]) * 20)
        head.bias.zero_()
    path = tmp_path / "head.pt"
    torch.save({"state_dict": head.state_dict(), "classes": ["mugs", "pet supplies", "other"]}, path)

    settings = load_settings(device="cpu", data_dir=tmp_path, batch_max_size=1, category_head_path=path)
    step = TaggingStep()
    result = step.run(make_ctx(coffee, settings))
    assert result.data["category"]["name"] == "mugs"
    assert result.data["category"]["source"] == "category-head"
    assert {t.source for t in result.tags} == {"imagenet", "category-head"}
    assert step.version(settings).startswith("efficientnet-lite0-imagenet@57934424+category-head@")


def test_torch_resampled_input_gives_the_labels_of_pillow_s(model: EfficientNetLite0) -> None:
    """Issue 14: the eval crop of photos larger than the input is made by torch's uint8
    antialiased bicubic instead of Pillow's. Pinned against the input as it was made before
    (Pillow, the crop's box): the same top label and the same top-5 set (two near-tied labels
    may swap places), probabilities within 5e-3, embeddings at cosine >= 0.9999."""
    from worker.models.common import rgb
    from worker.models.runtime import Prepared
    from worker.steps.tagging import INPUT_SIZE, eval_crop_box

    def pillow_prepare(image: Image.Image) -> Prepared:
        box = eval_crop_box(*image.size)
        crop = rgb(image).resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC, box=box)
        return Prepared(torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0, {})

    for name in ("coffee", "chelsea", "rocket"):
        base = Image.fromarray(getattr(data, name)()).convert("RGB")
        for size in (base.size, (1225, 816), (816, 1225)):
            image = base.resize(size, Image.Resampling.BICUBIC)
            before, after = (model.postprocess(model.forward_batch([item])[0], {})
                             for item in (pillow_prepare(image), model.prepare(image)))
            top_before, top_after = ([n for n, _ in r.top_labels(5)] for r in (before, after))
            assert top_before[0] == top_after[0] and set(top_before) == set(top_after), (name, size)
            assert float((before.probs - after.probs).abs().max()) < 5e-3, (name, size)
            assert float(before.embedding @ after.embedding) >= 0.9999, (name, size)
