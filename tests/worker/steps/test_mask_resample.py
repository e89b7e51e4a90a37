"""Mask.resized enlarges with Pillow's bilinear (issue 14's overhead cuts): the same values as
the separable weight matrices it replaced (F.interpolate's sampling), for whole photos and
boxes, and the shrinking path is still those matrices."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from worker.steps.segmentation import Mask, _bilinear_weights


def _matrices(mask: Mask, width: int, height: int, box: tuple[float, float, float, float] | None) -> np.ndarray:
    x0, y0, x1, y1 = box if box is not None else (0.0, 0.0, *map(float, mask.size))
    src_h, src_w = mask.prob.shape
    xs = (x0 + (np.arange(width) + 0.5) * (x1 - x0) / width) * (src_w / mask.size[0])
    ys = (y0 + (np.arange(height) + 0.5) * (y1 - y0) / height) * (src_h / mask.size[1])
    return np.clip(_bilinear_weights(src_h, ys) @ mask.prob @ _bilinear_weights(src_w, xs).T, 0.0, 1.0)


@pytest.mark.parametrize(("size", "box", "out"), [
    ((1155, 866), None, (1024, 768)),                      # the analysis copy
    ((1155, 866), (100.0, 80.0, 1055.0, 806.0), (955, 726)),  # a cutout at full resolution
    ((2000, 1500), (10.5, 20.25, 1900.0, 1400.0), (700, 500)),
    ((640, 480), (0.0, 0.0, 640.0, 1.0), (640, 1)),         # one row at the edge
    ((200, 150), None, (200, 150)),                        # smaller than the mask: shrinking
    ((90, 120), (5.0, 5.0, 60.0, 100.0), (55, 95)),
])
def test_resized_matches_the_weight_matrices(size: tuple[int, int], box: tuple[float, float, float, float] | None,
                                             out: tuple[int, int]) -> None:
    rng = np.random.default_rng(7)
    coarse = rng.random((24, 24)).astype(np.float32)
    prob = np.asarray(Image.fromarray(coarse, "F").resize((320, 320), Image.Resampling.BICUBIC)).clip(0, 1)
    mask = Mask(prob.astype(np.float32), size)
    got = mask.resized(*out, box)
    assert got.shape == (out[1], out[0]) and got.dtype == np.float32
    np.testing.assert_allclose(got, _matrices(mask, *out, box), atol=1e-5)
