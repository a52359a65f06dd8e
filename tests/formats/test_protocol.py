"""A new format is one object and one line: registered, it is read by every command.

The toy form below (a JSON header line naming each tensor's dtype, shape and
byte range, then the bytes) is defined here only; registering it touches no
detection, planning or API code: ``inspect``, ``verify`` and a dry-run
``dedupe`` read it as they read safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import tiecli
from tiecli import formats
from tiecli.checkpoint import Checkpoint, Entry
from tiecli.cli import app
from tiecli.dtypes import uint_view
from tiecli.formats.base import Format

runner = CliRunner()


class ToyBlob:
    """Bytes held in memory (a toy file is small)."""

    def __init__(self, data: bytes, at: int):
        self.data, self.at, self.nbytes = data, at, len(data)

    @property
    def order(self) -> tuple[int, int]:
        return (0, self.at)

    def read(self, offset: int, size: int) -> bytes:
        return self.data[offset : offset + size]

    def readinto(self, offset: int, view: memoryview) -> None:
        view[:] = self.data[offset : offset + len(view)]

    def array(self, dtype: str, shape: tuple[int, ...]) -> Any:
        return np.frombuffer(self.data, dtype=uint_view(dtype)).reshape(shape)


class ToyReader:
    def __init__(self, path: Path):
        self.path, self.bytes_read = path, 0
        head, _, self.data = path.read_bytes().partition(b"\n")
        self.header: dict[str, list[Any]] = json.loads(head)

    def entries(self) -> list[Entry]:
        out = []
        for name, (dtype, shape, start, end) in self.header.items():
            blob = ToyBlob(self.data[start:end], start)
            out.append(Entry(name, dtype, tuple(shape), end - start, blob, file=self.path))
        return out

    def close(self) -> None:
        pass


class Toy(Format):
    name = "toy"
    keeps_record = False

    def claims(self, path: Path) -> bool:
        return path.suffix == ".toy"

    def open(self, path: Path, shown: Path, torch_free: bool) -> Checkpoint:
        reader = ToyReader(path)
        entries = {e.name: e for e in reader.entries()}
        return Checkpoint(shown, self.name, entries, [path], readers=[reader])


def write_toy(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    header, data = {}, b""
    for name, a in tensors.items():
        raw = np.ascontiguousarray(a, dtype=np.float32).tobytes()
        header[name] = ["F32", list(a.shape), len(data), len(data) + len(raw)]
        data += raw
    path.write_bytes(json.dumps(header).encode() + b"\n" + data)
    return path


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(formats, "FORMATS", list(formats.FORMATS))  # undone after the test
    formats.register(Toy())  # the one line a new format needs
    rng = np.random.default_rng(0)
    embed = rng.standard_normal((64, 16)).astype(np.float32)
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    (tmp_path / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    tensors = {"transformer.wte.weight": embed, "transformer.h.0.w": rng.standard_normal((16, 16))}
    return write_toy(tmp_path / "model.toy", tensors | {"lm_head.weight": embed})


def test_a_registered_format_is_inspected(toy: Path) -> None:
    r = tiecli.inspect(toy, use_transformers=False)
    assert r.format == "toy"
    assert [(t.alias, t.source, t.kind) for t in r.ties] == [
        ("lm_head.weight", "transformer.wte.weight", "tied")
    ]
    assert r.dedupable_bytes == 64 * 16 * 4


def test_a_registered_format_is_verified_through_the_cli(toy: Path) -> None:
    result = runner.invoke(app, ["verify", str(toy), "--require-deduped", "--json"])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    (checked,) = doc["checkpoints"]
    assert checked["format"] == "toy"
    assert [p["code"] for p in checked["problems"]] == ["duplicate-stored"]
    assert tiecli.verify(toy, use_transformers=False).ok


def test_a_registered_format_is_planned(toy: Path) -> None:
    """Planning asks the form what it can hold: the toy keeps no record, so none is planned."""
    r = tiecli.dedupe(toy, dry_run=True, use_transformers=False)
    assert [t.alias for t in r.removed] == ["lm_head.weight"]
    assert r.record == []
    assert r.bytes_saved == 64 * 16 * 4


def test_a_registered_format_is_found_in_a_folder(toy: Path) -> None:
    """A folder is searched for the files a registered form claims, after the built-in ones."""
    r = tiecli.inspect(toy.parent, use_transformers=False)
    assert r.format == "toy" and [t.alias for t in r.ties] == ["lm_head.weight"]


def test_an_unregistered_format_is_not_read(tmp_path: Path) -> None:
    path = write_toy(tmp_path / "model.toy", {"w": np.zeros((2, 2))})
    with pytest.raises(tiecli.TiecliError):
        tiecli.inspect(path)


def test_every_form_is_registered_under_its_name() -> None:
    names = [f.name for f in formats.FORMATS]
    assert len(names) == len(set(names))
    assert {
        "safetensors",
        "safetensors-sharded",
        "pytorch",
        "pytorch-sharded",
        "gguf",
        "dcp",
    } <= set(names)
    assert all(formats.form_named(n).name == n for n in names)
