from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import FIXTURES


@pytest.fixture
def copy_fixture(tmp_path: Path):
    """Copy a fixture file or folder into tmp_path (tests never touch fixtures/)."""

    def copy(rel: str | Path, name: str | None = None) -> Path:
        src = FIXTURES / rel
        dst = tmp_path / (name or src.name)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        return dst

    return copy


@pytest.fixture
def no_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import transformers`` fail, as on a machine without the hf extra."""
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
