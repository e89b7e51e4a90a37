"""JPEG facts read from the file itself: quality estimated from the quantisation tables."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# The IJG (libjpeg) reference luminance table, in natural (row-major) order, as in Annex K.
_IJG_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
], dtype=np.float64)


def estimate_quality(raw: bytes) -> int | None:
    """IJG-equivalent quality (1..100) of a JPEG, None for other formats.

    libjpeg scales its reference table by S = 5000/q (q < 50) or 200 - 2q; inverting the mean
    scale of the luminance table gives the quality most encoders were asked for.
    """
    try:
        img = Image.open(io.BytesIO(raw))
    except (OSError, SyntaxError, ValueError):  # what Pillow raises for bytes it cannot identify
        return None
    tables = getattr(img, "quantization", None)
    if img.format != "JPEG" or not tables or 0 not in tables:
        return None
    luma = np.asarray(tables[0], dtype=np.float64)
    if luma.size != 64:
        return None
    # Pillow returns tables in natural order; the ratio is robust to the order anyway.
    scale = float(np.mean(luma / _IJG_LUMA) * 100.0)
    if scale <= 0:
        return 100
    quality = (200.0 - scale) / 2.0 if scale <= 100 else 5000.0 / scale
    return int(round(min(100.0, max(1.0, quality))))
