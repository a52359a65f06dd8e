"""Shared paths and constants for the tests."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
MANIFEST = json.loads((FIXTURES / "MANIFEST.json").read_text())
MODELS = ["gpt2", "llama-tied", "llama-untied", "t5", "bert-mlm"]
TIED_MODELS = ["gpt2", "llama-tied", "t5", "bert-mlm"]
FORMS = ["hf", "hf-sharded", "full", "full-sharded", "bin"]


def fixture_path(model: str, form: str) -> Path:
    return FIXTURES / model / form
