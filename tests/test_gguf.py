"""GGUF checkpoints: llama.cpp's head rule as ties, dedupe/untie, hostile headers.

Every file is written here with gguf-py's ``GGUFWriter`` in llama.cpp's tensor
naming; the head rule comes from tiecli/data/gguf_heads.json.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tiecli.cli import app

gguf = pytest.importorskip("gguf")

runner = CliRunner()
VOCAB, HIDDEN = 64, 32


def _quantize(a: np.ndarray, qtype: object) -> np.ndarray:
    return gguf.quants.quantize(a, qtype)


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "token_embd.weight": rng.standard_normal((VOCAB, HIDDEN), dtype=np.float32),
        "blk.0.attn_norm.weight": rng.standard_normal(HIDDEN, dtype=np.float32),
        "blk.0.attn_q.weight": rng.standard_normal((HIDDEN, HIDDEN), dtype=np.float32).astype(
            np.float16
        ),
        "blk.0.ffn_up.weight": rng.standard_normal((HIDDEN, HIDDEN), dtype=np.float32),
        "output_norm.weight": rng.standard_normal(HIDDEN, dtype=np.float32),
    }


def write_gguf(
    path: Path,
    arch: str = "llama",
    head: str | None = "absent",
    q8: bool = False,
    head_q8: bool | None = None,
    alignment: int | None = None,
) -> Path:
    """A tiny llama.cpp-named GGUF. ``head``: ``absent``, ``copy`` (a byte-identical
    output.weight), ``differ`` (a separate head). ``q8``: token_embd as Q8_0;
    ``head_q8``: the head's own type (default: the embedding's)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(128)
    w.add_block_count(1)
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(VOCAB)])
    if alignment is not None:
        w.add_custom_alignment(alignment)
    t = _tensors()
    embd = t["token_embd.weight"]
    Q8 = gguf.GGMLQuantizationType.Q8_0

    def add(name: str, a: np.ndarray, quant: bool) -> None:
        if quant:
            w.add_tensor(name, _quantize(a, Q8), raw_dtype=Q8)
        else:
            w.add_tensor(name, a)

    add("token_embd.weight", embd, q8)
    for name in ("blk.0.attn_norm.weight", "blk.0.attn_q.weight", "blk.0.ffn_up.weight"):
        w.add_tensor(name, t[name])
    w.add_tensor("output_norm.weight", t["output_norm.weight"])
    hq = q8 if head_q8 is None else head_q8
    if head == "copy":
        add("output.weight", embd, hq)
    elif head == "differ":
        add("output.weight", embd * 2 + 1, hq)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def run(*args: str):
    return runner.invoke(app, [*args])


def doc(*args: str) -> dict:
    r = run(*args, "--json")
    assert r.exit_code in (0, 1), r.output
    return json.loads(r.stdout)


def fields(path: Path) -> dict[str, bytes]:
    """Every key/value as gguf reads it (the tensor count aside)."""
    reader = gguf.GGUFReader(path)
    return {
        k: b"".join(p.tobytes() for p in f.parts)
        for k, f in reader.fields.items()
        if k != "GGUF.tensor_count"
    }


def tensors(path: Path) -> dict[str, tuple[int, tuple[int, ...], bytes]]:
    reader = gguf.GGUFReader(path)
    return {
        t.name: (int(t.tensor_type), tuple(int(d) for d in t.shape), t.data.tobytes())
        for t in reader.tensors
    }


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- inspect / verify ---------------------------------------------------------


def test_absent_head_is_a_tie_where_llama_falls_back(tmp_path: Path) -> None:
    p = write_gguf(tmp_path / "m.gguf")
    d = doc("inspect", str(p))
    assert d["format"] == "gguf"
    assert d["tensors"] == 5
    [tie] = d["ties"]
    assert (tie["alias"], tie["source"], tie["kind"]) == (
        "output.weight",
        "token_embd.weight",
        "tied",
    )
    assert tie["evidence"] == ["declared"] and tie["stored"] is False
    assert d["dedupable_bytes"] == 0
    assert "llama" in d["declared_by"]
    v = doc("verify", str(p))
    assert v["ok"] is True and v["problems"] == []


@pytest.mark.parametrize("q8", [False, True])
def test_stored_duplicate_head(tmp_path: Path, q8: bool) -> None:
    p = write_gguf(tmp_path / "m.gguf", head="copy", q8=q8)
    d = doc("inspect", str(p))
    [tie] = d["ties"]
    assert tie["alias"] == "output.weight" and tie["stored"] is True
    assert "declared" in tie["evidence"] and "value" in tie["evidence"]
    assert d["dedupable_bytes"] == tie["bytes"] > 0
    v = doc("verify", str(p), "--require-deduped")
    assert v["ok"] is False
    assert [p["code"] for p in v["problems"]] == ["duplicate-stored"]


def test_differing_head_is_separate(tmp_path: Path) -> None:
    p = write_gguf(tmp_path / "m.gguf", head="differ")
    d = doc("inspect", str(p))
    assert d["ties"] == [] and d["dedupable_bytes"] == 0
    assert any("separate head" in n for n in d["notes"])
    assert doc("verify", str(p))["ok"] is True


def test_different_types_are_reported_never_dropped(tmp_path: Path) -> None:
    p = write_gguf(tmp_path / "m.gguf", head="copy", q8=True, head_q8=False)
    d = doc("inspect", str(p))
    assert d["ties"] == []
    assert any("different types" in n and "Q8_0" in n for n in d["notes"])
    before = sha(p)
    r = doc("dedupe", str(p))
    assert r["removed"] == [] and r["changed"] is False
    assert sha(p) == before


def test_architecture_without_fallback_missing_its_head(tmp_path: Path) -> None:
    from tiecli.formats.gguf import head_kind

    assert head_kind("qwen2moe") == "required"
    p = write_gguf(tmp_path / "m.gguf", arch="qwen2moe")
    d = doc("inspect", str(p))
    assert d["ties"] == []
    [problem] = d["problems"]
    assert problem["code"] == "gguf-head-missing" and problem["severity"] == "error"
    assert problem["tensors"] == ["output.weight"]
    r = run("verify", str(p), "--json")
    assert r.exit_code == 1
    assert json.loads(r.stdout)["problems"][0]["code"] == "gguf-head-missing"
    # stored, the head is fine
    q = write_gguf(tmp_path / "q.gguf", arch="qwen2moe", head="differ")
    assert doc("verify", str(q))["ok"] is True


def test_always_tied_architecture_is_never_untied(tmp_path: Path) -> None:
    p = write_gguf(tmp_path / "m.gguf", arch="gemma")
    [tie] = doc("inspect", str(p))["ties"]
    assert tie["alias"] == "output.weight" and tie["stored"] is False
    u = doc("untie", str(p), "-o", str(tmp_path / "u.gguf"))
    assert u["restored"] == []
    assert "output.weight" not in tensors(tmp_path / "u.gguf")


def test_table_is_read_from_llama_cpp() -> None:
    from tiecli.formats.gguf import heads_table

    table = heads_table()
    assert table["source"]["repo"] == "ggml-org/llama.cpp"
    kinds = table["architectures"]
    assert kinds["llama"] == kinds["qwen2"] == "falls-back"
    assert kinds["gemma"] == "always-tied"
    assert kinds["bert"] == "no-head"
    assert len(kinds) > 100


# -- dedupe / untie -----------------------------------------------------------


@pytest.mark.parametrize("q8", [False, True])
def test_dedupe_then_untie_restores_every_tensor(tmp_path: Path, q8: bool) -> None:
    src = write_gguf(tmp_path / "m.gguf", head="copy", q8=q8, alignment=64)
    original, meta = tensors(src), fields(src)
    deduped = tmp_path / "d.gguf"
    d = doc("dedupe", str(src), "-o", str(deduped))
    assert d["removed"] == ["output.weight"] and d["bytes_saved"] > 0
    assert "output.weight" not in tensors(deduped)
    assert fields(deduped) == meta  # every key, general.alignment included
    assert gguf.GGUFReader(deduped).alignment == 64
    [tie] = doc("inspect", str(deduped))["ties"]
    assert tie["stored"] is False
    # idempotent
    again = doc("dedupe", str(deduped))
    assert again["removed"] == [] and again["changed"] is False
    untied = tmp_path / "u.gguf"
    u = doc("untie", str(deduped), "-o", str(untied))
    assert u["restored"] == ["output.weight"]
    assert tensors(untied) == original
    assert fields(untied) == meta


def test_in_place_and_dry_run(tmp_path: Path) -> None:
    p = write_gguf(tmp_path / "m.gguf", head="copy")
    original, meta, before = tensors(p), fields(p), sha(p)
    dry = doc("dedupe", str(p), "--dry-run")
    assert dry["dry_run"] is True and dry["removed"] == ["output.weight"]
    assert sha(p) == before
    d = doc("dedupe", str(p))
    assert d["removed"] == ["output.weight"]
    assert "output.weight" not in tensors(p) and fields(p) == meta
    udry = doc("untie", str(p), "--dry-run")
    assert udry["restored"] == ["output.weight"]
    assert "output.weight" not in tensors(p)
    doc("untie", str(p))
    assert tensors(p) == original and fields(p) == meta
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.gguf"]  # nothing left beside


def test_differing_head_is_kept_by_dedupe_and_by_value(tmp_path: Path) -> None:
    p = write_gguf(tmp_path / "m.gguf", head="differ")
    before = sha(p)
    d = doc("dedupe", str(p), "--by-value", "--min-bytes", "0")
    assert d["removed"] == [] and sha(p) == before


def test_no_fallback_architecture_duplicate_is_kept(tmp_path: Path) -> None:
    """A head byte-identical to the embedding of an architecture that requires it
    is no tie: dropping it would make the file unloadable."""
    p = write_gguf(tmp_path / "m.gguf", arch="qwen2moe", head="copy")
    before = sha(p)
    d = doc("dedupe", str(p), "--by-value", "--min-bytes", "0")
    assert "output.weight" not in d["removed"]
    assert sha(p) == before


def test_folder_with_one_gguf(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    write_gguf(folder / "tiny-Q8_0.gguf", head="copy")
    d = doc("inspect", str(folder))
    assert d["format"] == "gguf" and d["dedupable_bytes"] > 0


# -- hostile files ------------------------------------------------------------


def _valid(tmp_path: Path) -> bytes:
    return write_gguf(tmp_path / "valid.gguf").read_bytes()


def _kv_start() -> int:
    return 24


def _hostile(raw: bytes) -> dict[str, bytes]:
    """Corruptions of a valid file, each a header a careless reader trusts."""
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", raw, 4)
    # the first key: its length field sits at byte 24
    (klen,) = struct.unpack_from("<Q", raw, 24)
    first_value_type_at = 24 + 8 + klen
    out = {
        "truncated-header": raw[:20],
        "truncated-kv": raw[:40],
        "huge-kv-count": raw[:16] + struct.pack("<Q", 1 << 60) + raw[24:],
        "huge-tensor-count": raw[:8] + struct.pack("<Q", 1 << 60) + raw[16:],
        "absurd-key-length": raw[:24] + struct.pack("<Q", 1 << 62) + raw[32:],
        "unknown-value-type": raw[:first_value_type_at]
        + struct.pack("<I", 99)
        + raw[first_value_type_at + 4 :],
        "bad-version": raw[:4] + struct.pack("<I", 1) + raw[8:],
        "big-endian": raw[:4] + struct.pack(">I", version) + raw[8:],
        "bad-magic": b"GGUX" + raw[4:],
        "truncated-data": raw[: len(raw) - 100],
    }
    return out


def _tensor_info_at(raw: bytes, name: str) -> int:
    """Where the named tensor's info ends (its type, then its offset, end there)."""
    at = raw.index(name.encode()) + len(name)
    (n_dims,) = struct.unpack_from("<I", raw, at)
    return at + 4 + 8 * n_dims


def _hostile_tensors(raw: bytes) -> dict[str, bytes]:
    at = _tensor_info_at(raw, "output_norm.weight")
    return {
        "unknown-tensor-type": raw[:at] + struct.pack("<I", 200) + raw[at + 4 :],
        "offset-past-end": raw[: at + 4] + struct.pack("<Q", 1 << 40) + raw[at + 12 :],
        "offset-misaligned": raw[: at + 4] + struct.pack("<Q", 3) + raw[at + 12 :],
        "huge-dims": raw[: at - 8] + struct.pack("<Q", 1 << 61) + raw[at:],
    }


@pytest.mark.parametrize(
    "case",
    [
        "truncated-header",
        "truncated-kv",
        "huge-kv-count",
        "huge-tensor-count",
        "absurd-key-length",
        "unknown-value-type",
        "bad-version",
        "big-endian",
        "truncated-data",
        "unknown-tensor-type",
        "offset-past-end",
        "offset-misaligned",
        "huge-dims",
    ],
)
@pytest.mark.parametrize("command", ["inspect", "verify", "dedupe", "untie"])
def test_hostile_gguf_is_a_clean_error(tmp_path: Path, case: str, command: str) -> None:
    raw = _valid(tmp_path)
    cases = _hostile(raw) | _hostile_tensors(raw)
    bad = tmp_path / f"{case}.gguf"
    bad.write_bytes(cases[case])
    before = sha(bad)
    r = run(command, str(bad))
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {bad}: "), r.stderr
    assert "Traceback" not in r.output
    assert sha(bad) == before
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(["valid.gguf", bad.name])


def test_bad_magic_with_gguf_suffix(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(_hostile(_valid(tmp_path))["bad-magic"])
    r = run("inspect", str(bad))
    assert r.exit_code == 2 and "GGUF magic" in r.stderr
