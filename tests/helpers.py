"""Shared paths and constants for the tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
MANIFEST = json.loads((FIXTURES / "MANIFEST.json").read_text())
MODELS = ["gpt2", "llama-tied", "llama-untied", "t5", "bert-mlm"]
TIED_MODELS = ["gpt2", "llama-tied", "t5", "bert-mlm"]
FORMS = ["hf", "hf-sharded", "full", "full-sharded", "bin"]


def fixture_path(model: str, form: str) -> Path:
    return FIXTURES / model / form


# Every command's JSON document starts with these fields (SPEC §4).
JSON_HEADER = ("command", "path", "format", "ok", "problems")


def with_config(model: str, form: str, dst: Path, **changes: Any) -> Path:
    """A copy of a fixture folder whose config.json has ``changes`` applied."""
    shutil.copytree(fixture_path(model, form), dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst
