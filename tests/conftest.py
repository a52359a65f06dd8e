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


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Declared-tie answers are cached on disk; tests use a cache of their own."""
    import os

    old = os.environ.get("TIECLI_CACHE_DIR")
    os.environ["TIECLI_CACHE_DIR"] = str(tmp_path_factory.mktemp("tiecli-cache"))
    yield
    if old is None:
        os.environ.pop("TIECLI_CACHE_DIR", None)
    else:
        os.environ["TIECLI_CACHE_DIR"] = old
