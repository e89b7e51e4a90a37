"""The pipeline tests analyse small photos written to ``tmp_path``: their settings allow
reading local files from there (local files are refused by default, see
CATALOG_FETCH_ALLOW_DIRS)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from worker.config import Settings


@pytest.fixture
def make_settings(make_settings: Callable[..., Settings], tmp_path: Path) -> Callable[..., Settings]:
    def _make(**overrides: object) -> Settings:
        overrides.setdefault("fetch_allow_dirs", [str(tmp_path)])
        return make_settings(**overrides)

    return _make
