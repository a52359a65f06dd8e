"""Hostile files get bounded memory, time and open files, and never a traceback.

Each test builds its input: a pickle that unpacks to more than tiecli reads, a tie
record far larger than its file, a payload nested thousands of levels deep, a stray
index beside a file, hundreds of shards under a small limit on open files, a storage
named as two types, archives saved with a non-default storage alignment.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tiecli.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIECLI_DEBUG", raising=False)


def _one_error(result, path: Path) -> str:  # type: ignore[no-untyped-def]
    """The single ``Error: <path>: ...`` line of a refused command."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"Error: {path}: "), result.stderr
    return lines[0]


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def _safetensors(path: Path, tensors: dict[str, bytes], metadata: dict[str, str]) -> None:
    """A safetensors file of F32 vectors, written by hand (no library checks it)."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset, data = 0, b""
    for name, raw in tensors.items():
        header[name] = {
            "dtype": "F32",
            "shape": [len(raw) // 4],
            "data_offsets": [offset, offset + len(raw)],
        }
        offset += len(raw)
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


# -- pickles that unpack to more than tiecli reads --------------------------------


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
def test_a_pickle_larger_than_the_cap_is_refused_before_it_is_read(
    tmp_path: Path, compression: int
) -> None:
    """80 MiB of data.pkl (a valid pickle, then zeros after its STOP): deflated it is an
    82 KiB file that torch would unpack whole. Both readers refuse it from the zip's
    directory alone."""
    src = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(4)}, src)
    with zipfile.ZipFile(src) as z:
        records = [(i.filename, z.read(i)) for i in z.infolist()]
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w") as z:
        for name, data in records:
            if not name.endswith("/data.pkl"):
                z.writestr(name, data)
                continue
            info = zipfile.ZipInfo(name)
            info.compress_type = compression
            with z.open(info, "w") as f:
                f.write(data)
                zeros = bytes(1 << 20)
                for _ in range(80):
                    f.write(zeros)
    if compression == zipfile.ZIP_DEFLATED:
        assert bomb.stat().st_size < 1 << 20
    before = _digest(tmp_path)
    for command in ("inspect", "verify", "dedupe", "untie"):
        line = _one_error(runner.invoke(app, [command, str(bomb)]), bomb)
        assert "data.pkl unpacks to 83886" in line and "64 MiB" in line, line
    assert _digest(tmp_path) == before


# -- a tie record far larger than its file -----------------------------------------


@pytest.mark.parametrize("form", ["tiecli", "convention"])
def test_a_record_far_larger_than_the_file_is_a_bad_record(tmp_path: Path, form: str) -> None:
    """20,000 aliases of the one tensor a file stores: the record is refused as a
    whole, so neither validation nor the human table sees 20,000 entries."""
    n = 20_000
    if form == "tiecli":
        ties = [{"alias": f"a.{i}", "source": "w"} for i in range(n)]
        metadata = {"tiecli": json.dumps({"version": 1, "ties": ties})}
    else:
        metadata = {f"a.{i}": "w" for i in range(n)}
    path = tmp_path / "model.safetensors"
    _safetensors(path, {"w": struct.pack("<4f", 1, 2, 3, 4)}, metadata)

    result = runner.invoke(app, ["inspect", str(path), "--json"])
    doc = json.loads(result.stdout)
    assert doc["ties"] == []
    bad = [p for p in doc["problems"] if p["code"] == "bad-record"]
    assert len(bad) == 1 and "more than can be true (at most 1028)" in bad[0]["message"]

    start = time.monotonic()
    human = runner.invoke(app, ["inspect", str(path)], terminal_width=100)
    assert "bad-record" in human.stdout and "a.19999" not in human.stdout
    assert time.monotonic() - start < 5
    line = _one_error(runner.invoke(app, ["dedupe", str(path)]), path)
    assert "record" in line


def test_a_record_within_the_cap_is_read(tmp_path: Path) -> None:
    """Several aliases of one source are true of a small file (T5 names its embedding
    three more times): the cap leaves room for them."""
    ties = [{"alias": f"a.{i}", "source": "w"} for i in range(1028)]
    path = tmp_path / "model.safetensors"
    _safetensors(
        path,
        {"w": struct.pack("<4f", 1, 2, 3, 4)},
        {"tiecli": json.dumps({"version": 1, "ties": ties})},
    )
    doc = json.loads(runner.invoke(app, ["inspect", str(path), "--json"]).stdout)
    assert doc["problems"] == [] and len(doc["ties"]) == 1028


# -- deep nesting and stray indexes --------------------------------------------------


def _deep_checkpoint(path: Path, shared: bool) -> None:
    """A Lightning-style checkpoint with a list nested 5,000 levels deep beside the
    state dict, whose embedding and head are equal copies (or one shared storage)."""
    deep: list[object] = []
    for _ in range(5000):
        deep = [deep]
    embed = torch.arange(16.0).reshape(4, 4)
    head = embed if shared else embed.clone()
    sd = {"model.embed_tokens.weight": embed, "lm_head.weight": head}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # torch.save recurses once per level too
    try:
        torch.save({"state_dict": sd, "epoch": 3, "junk": deep}, path)
    finally:
        sys.setrecursionlimit(limit)


@pytest.mark.parametrize(("args", "shared"), [(["dedupe", "--by-value"], False), (["untie"], True)])
def test_a_deeply_nested_payload_is_a_clean_error(
    tmp_path: Path, args: list[str], shared: bool
) -> None:
    path = tmp_path / "last.ckpt"
    _deep_checkpoint(path, shared)
    before = _digest(tmp_path)
    inspected = runner.invoke(app, ["inspect", str(path), "--json"])
    assert inspected.exit_code == 0 and len(json.loads(inspected.stdout)["ties"]) == 1
    line = _one_error(runner.invoke(app, [*args, str(path)]), path)
    assert "nests too deeply" in line
    assert _digest(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def _state_dict_with_metadata(path: Path, metadata: object, shared: bool) -> None:
    """A ``model.state_dict()`` as torch.save writes it: an OrderedDict whose
    ``_metadata`` holds module versions (here ``metadata``)."""
    embed = torch.arange(16.0).reshape(4, 4)
    sd = OrderedDict(
        [("model.embed_tokens.weight", embed), ("lm_head.weight", embed if shared else embed * 1)]
    )
    sd._metadata = {"": {"version": 2}, "model": metadata}  # type: ignore[attr-defined]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        torch.save(sd, path)
    finally:
        sys.setrecursionlimit(limit)


def test_module_versions_nested_too_deeply_are_a_clean_error(tmp_path: Path) -> None:
    deep: list[object] = []
    for _ in range(5000):
        deep = [deep]
    path = tmp_path / "model.pt"
    _state_dict_with_metadata(path, {"version": deep}, shared=False)
    before = _digest(tmp_path)
    line = _one_error(runner.invoke(app, ["dedupe", "--by-value", str(path)]), path)
    assert "nests too deeply" in line
    assert _digest(tmp_path) == before


def test_untie_of_a_pickle_keeps_the_module_versions(tmp_path: Path) -> None:
    """``load_state_dict`` reads ``_metadata`` to convert old modules' parameters: a
    pickle rewritten through torch keeps it, and stays an OrderedDict."""
    path = tmp_path / "model.pt"
    _state_dict_with_metadata(path, {"version": 1}, shared=True)
    result = runner.invoke(app, ["untie", str(path)])
    assert result.exit_code == 0, result.output
    got = torch.load(path, weights_only=True)
    assert isinstance(got, OrderedDict)
    assert got._metadata == {"": {"version": 2}, "model": {"version": 1}}
    assert got["lm_head.weight"].data_ptr() != got["model.embed_tokens.weight"].data_ptr()


def test_a_stray_index_beside_a_file_is_ignored(tmp_path: Path) -> None:
    """``verify FILE`` looks for an index naming FILE; one that is no index at all
    (nested 100,000 levels, a folder, a FIFO) names nothing and breaks nothing."""
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(4)}, path)
    (tmp_path / "junk.index.json").write_text("[" * 100_000)
    (tmp_path / "dir.index.json").mkdir()
    os.mkfifo(tmp_path / "pipe.index.json")
    result = runner.invoke(app, ["verify", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert json.loads(result.stdout)["ok"] is True


def test_a_sibling_index_is_read_under_the_size_cap(tmp_path: Path) -> None:
    """A sibling index of 65 MiB (sparse: it costs no disk) is not read into memory."""
    from tiecli.formats import indexes_in

    with open(tmp_path / "huge.index.json", "wb") as f:
        f.truncate(65 << 20)
    tracemalloc.start()
    try:
        assert indexes_in(tmp_path) == []
        _size, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


# -- many shards, few open files --------------------------------------------------------


def _many_shards(folder: Path, count: int, fmt: str) -> None:
    """``count`` one-tensor shards; the embedding in the first equals the head in the
    last (safetensors) or beside it (pickles share storage only within a file)."""
    folder.mkdir()
    weight_map = {}
    head_in = count - 1 if fmt == "safetensors" else 0
    for i in range(count):
        name = f"model-{i + 1:05d}-of-{count:05d}.{fmt}"
        tensors = {f"model.layers.{i}.weight": torch.full((4,), float(i))}
        if i == 0:
            tensors["model.embed_tokens.weight"] = torch.arange(4.0)
        if i == head_in:
            tensors["lm_head.weight"] = torch.arange(4.0)
        if fmt == "safetensors":
            _safetensors(folder / name, {k: v.numpy().tobytes() for k, v in tensors.items()}, {})
        else:
            torch.save(tensors, folder / name)
        weight_map.update(dict.fromkeys(tensors, name))
    index = (
        "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    )
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _limit_files() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_three_hundred_shards_under_a_limit_of_256_open_files(tmp_path: Path, fmt: str) -> None:
    """macOS allows 256 open files by default; a checkpoint of more shards still works."""
    ckpt = tmp_path / "ckpt"
    _many_shards(ckpt, 300, fmt)

    def tiecli(*args: str) -> dict[str, object]:
        cmd = [sys.executable, "-m", "tiecli", *args, "--json"]
        done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_limit_files)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    assert tiecli("inspect", str(ckpt))["tensors"] == 302
    assert tiecli("verify", str(ckpt))["ok"] is True
    deduped = tiecli(
        "dedupe", "--by-value", "--min-bytes", "0", str(ckpt), "-o", str(tmp_path / "d")
    )
    assert deduped["removed"] and deduped["ok"] is True
    assert tiecli("untie", str(tmp_path / "d"), "-o", str(tmp_path / "u"))["ok"] is True
    assert tiecli("dedupe", "--by-value", "--min-bytes", "0", str(ckpt))["ok"] is True


def test_a_replaced_file_is_not_read_as_the_one_opened(tmp_path: Path) -> None:
    """A file closed to make room is opened again by its path; if another file took
    that path meanwhile, reading it is an error, never the other file's bytes."""
    from tiecli.errors import CheckpointFormatError
    from tiecli.formats.safetensors import SafetensorsFile
    from tiecli.io import OPEN

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.safetensors")
        _safetensors(paths[-1], {"w": struct.pack("<4f", i, i, i, i)}, {})
    limit = OPEN.limit
    files = []
    try:
        OPEN.limit = 1
        files = [SafetensorsFile(p) for p in paths]
        assert files[-1].pread(files[-1].data_start, 4) == struct.pack("<f", 2)
        assert files[0].fd < 0  # closed to keep one file open
        assert files[0].pread(files[0].data_start, 4) == struct.pack("<f", 0)
        os.replace(paths[2], paths[1])
        with pytest.raises(CheckpointFormatError, match="removed or replaced while being read"):
            files[1].pread(files[1].data_start, 4)
        paths[0].unlink()
        _safetensors(tmp_path / "3.safetensors", {"w": struct.pack("<4f", 3, 3, 3, 3)}, {})
        files.append(SafetensorsFile(tmp_path / "3.safetensors"))  # 0 closes to make room
        assert files[0].fd < 0
        with pytest.raises(CheckpointFormatError, match="removed or replaced while being read"):
            files[0].pread(files[0].data_start, 4)
    finally:
        OPEN.limit = limit
        for f in files:
            f.close()


# -- a storage named as two types ---------------------------------------------------------


def test_a_storage_named_as_two_types_is_read_as_torch_reads_it(tmp_path: Path) -> None:
    """``b`` names ``a``'s float32 storage as a HalfStorage: torch keeps the first
    reference's type, so ``b`` is ``a`` itself, and so is it for tiecli."""
    from tiecli.formats.torchzip import open_torchzip
    from tiecli.formats.torchzip_pickle import Storage, dumps

    src = tmp_path / "src.pt"
    torch.save({"a": torch.arange(4.0), "b": torch.arange(4, dtype=torch.float16)}, src)
    reader = open_torchzip(src)
    assert reader is not None
    try:
        b = reader.items["b"]
        pid = b.args[0].pid
        b.args = (Storage((pid[0], pid[1], "0", "cpu", 4)), *b.args[1:])
        pkl = dumps(reader.top)
    finally:
        reader.close()
    path = tmp_path / "m.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith("/data/1"):
                data = pkl if info.filename.endswith("/data.pkl") else zin.read(info)
                zout.writestr(info.filename, data)
    want = torch.load(path, weights_only=True)
    assert want["b"].dtype == torch.float32

    doc = json.loads(runner.invoke(app, ["inspect", str(path), "--json"]).stdout)
    out = tmp_path / "out"
    result = runner.invoke(app, ["dedupe", str(path), "--to", "safetensors", "-o", str(out)])
    assert result.exit_code == 0, result.output
    import tiecli

    got = tiecli.load(out)
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert [(t["alias"], t["source"]) for t in doc["ties"]] == [("b", "a")]


# -- a non-default storage alignment -------------------------------------------------------


@pytest.mark.parametrize("alignment", [4096, 128])
def test_a_rewrite_keeps_the_recorded_storage_alignment(
    tmp_path: Path, alignment: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch computes where each storage starts from the alignment the file records
    (``calculate_storage_offsets``, and always on the ``meta`` device): the rewrite
    lays records out with that alignment, not 64 bytes."""
    from torch.utils.serialization import config

    embed = torch.arange(12.0).reshape(3, 4)
    sd = {
        "model.embed_tokens.weight": embed,
        "steps": torch.arange(5, dtype=torch.int16),
        "lm_head.weight": embed.clone(),
        "norm.weight": torch.ones(7, dtype=torch.bfloat16),
    }
    path = tmp_path / "model.pt"
    with config.patch({"save.storage_alignment": alignment}):
        torch.save(sd, path)
    out = tmp_path / "out.pt"
    result = runner.invoke(
        app, ["dedupe", "--by-value", "--min-bytes", "0", str(path), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(out) as z:
        assert z.read("model/.storage_alignment") == str(alignment).encode()
        for info in z.infolist():
            if "/data/" in info.filename:
                with open(out, "rb") as f:
                    f.seek(info.header_offset + 26)
                    name_len, extra_len = struct.unpack("<HH", f.read(4))
                start = info.header_offset + 30 + name_len + extra_len
                assert start % alignment == 0, info.filename

    monkeypatch.setenv("TORCH_SERIALIZATION_DEBUG", "1")  # torch checks its computed offsets
    for mmap in (False, True):
        for calculate in (False, True):
            with config.patch({"load.calculate_storage_offsets": calculate}):
                got = torch.load(out, weights_only=True, mmap=mmap)
            assert set(got) == set(sd)
            for name, t in sd.items():
                assert torch.equal(got[name], t), (name, mmap, calculate)
            assert got["lm_head.weight"].data_ptr() == got["model.embed_tokens.weight"].data_ptr()


def _with_record(tmp_path: Path, name: str, record: str, payload: bytes, deflate: bool) -> Path:
    """The gpt2 .bin fixture with one of its small records replaced."""
    from helpers import fixture_path

    src = fixture_path("gpt2", "bin") / "pytorch_model.bin"
    dst = tmp_path / name
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename.endswith("/" + record):
                kind = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
                zout.writestr(info.filename, payload, compress_type=kind)
            else:
                zout.writestr(info, zin.read(info))
    return dst


@pytest.mark.parametrize("record", ["byteorder", "version", ".format_version"])
def test_small_records_are_bounded_and_never_quoted(tmp_path: Path, record: str) -> None:
    bomb = _with_record(tmp_path, "bomb.pt", record, b"\0" * 50_000_000, deflate=True)
    secret = _with_record(tmp_path, "secret.pt", record, b"TOPSECRET", deflate=False)
    assert bomb.stat().st_size < 200_000
    for path in (bomb, secret):
        for command in ("inspect", "verify", "dedupe", "untie"):
            tracemalloc.start()
            r = runner.invoke(app, [command, str(path)])
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert r.exit_code == 2, r.output
            assert peak < 20 << 20, peak  # 50 MB unpacked before
            assert "TOPSECRET" not in r.output
            assert record in r.stderr and len(r.stderr.splitlines()) == 1


def test_an_index_naming_more_shards_than_any_checkpoint_is_refused(tmp_path: Path) -> None:
    """Each shard is opened (remotely: requested) and tracked: an index of a few MB could
    name millions. Refused before any shard is touched."""
    x = tmp_path / "x"
    x.mkdir()
    weight_map = {f"t{i}": f"model-{i:05d}.safetensors" for i in range(5000)}
    (x / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for command in ("inspect", "verify", "dedupe", "untie"):
        r = runner.invoke(app, [command, str(x)])
        assert r.exit_code == 2, r.output
        assert "5000 shards, more than the 4096" in r.stderr and len(r.stderr.splitlines()) == 1
