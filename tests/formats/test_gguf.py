"""GGUF checkpoints: llama.cpp's head rule as ties, dedupe/untie, hostile headers.

Every file is written here with gguf-py's ``GGUFWriter`` in llama.cpp's tensor
naming; the head rule comes from tiecli/data/gguf_heads.json.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def one_tensor_gguf(path: Path, keys: Callable[[Any], None]) -> Path:
    """A llama GGUF with only ``token_embd.weight``, after the metadata ``keys`` adds."""
    w = gguf.GGUFWriter(str(path), "llama")
    keys(w)
    w.add_tensor("token_embd.weight", _tensors()["token_embd.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


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
    assert any("different types" in n for n in r["notes"])
    assert sha(p) == before


def test_architecture_without_fallback_missing_its_head(tmp_path: Path) -> None:
    from tiecli.formats.gguf_heads import head_kind

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
    from tiecli.formats.gguf_heads import heads_table

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
    (folder / "README.md").write_text("a model card")
    d = doc("inspect", str(folder))
    assert d["format"] == "gguf" and d["dedupable_bytes"] > 0
    out = tmp_path / "out"
    r = doc("dedupe", str(folder), "-o", str(out))
    assert r["removed"] == ["output.weight"]
    assert sorted(x.name for x in out.iterdir()) == ["README.md", "tiny-Q8_0.gguf"]
    assert "output.weight" not in tensors(out / "tiny-Q8_0.gguf")
    doc("dedupe", str(folder))  # in place
    assert "output.weight" not in tensors(folder / "tiny-Q8_0.gguf")
    assert sorted(x.name for x in folder.iterdir()) == ["README.md", "tiny-Q8_0.gguf"]


# -- hostile files ------------------------------------------------------------


def _valid(tmp_path: Path) -> bytes:
    return write_gguf(tmp_path / "valid.gguf").read_bytes()


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
    # tokenizer.ggml.tokens: an array of strings; its count, then its first string's length
    at = raw.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 4 + 4
    out["huge-array-count"] = raw[:at] + struct.pack("<Q", 1 << 60) + raw[at + 8 :]
    out["absurd-string-length"] = raw[: at + 8] + struct.pack("<Q", 1 << 62) + raw[at + 16 :]
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


# each hostile case, and what its one-line error says
HOSTILE = {
    "truncated-header": "too short for a GGUF header",
    "truncated-kv": "metadata keys, more than the file can hold",
    "huge-kv-count": "metadata keys, more than the file can hold",
    "huge-tensor-count": "tensors, more than the file can hold",
    "absurd-key-length": "a metadata key runs past the end of the file",
    "unknown-value-type": "has unknown value type 99",
    "bad-version": "is GGUF version 1",
    "big-endian": "big-endian GGUF",
    "truncated-data": "its data runs past the end of the file",
    "huge-array-count": "array items, more than the file can hold",
    "absurd-string-length": "'tokenizer.ggml.tokens' runs past the end of the file",
    "unknown-tensor-type": "has unknown type 200",
    "offset-past-end": "its data runs past the end of the file",
    "offset-misaligned": "not a multiple of the alignment",
    "huge-dims": "its data runs past the end of the file",
}


@pytest.mark.parametrize("case", list(HOSTILE))
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
    assert HOSTILE[case] in lines[0]
    assert "Traceback" not in r.output
    assert sha(bad) == before
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(["valid.gguf", bad.name])


def test_bad_magic_with_gguf_suffix(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(_hostile(_valid(tmp_path))["bad-magic"])
    r = run("inspect", str(bad))
    assert r.exit_code == 2 and "GGUF magic" in r.stderr


@pytest.mark.parametrize(
    "case", ["huge-kv-count", "huge-tensor-count", "huge-array-count", "absurd-string-length"]
)
def test_hostile_counts_allocate_nothing_large(tmp_path: Path, case: str) -> None:
    """A count or length is checked against the file size before anything is built by it."""
    import tracemalloc

    from tiecli.errors import CheckpointFormatError
    from tiecli.formats.gguf import GGUFFile

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(_hostile(_valid(tmp_path))[case])
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointFormatError):
            GGUFFile(bad)
        _size, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def test_split_gguf_is_refused_with_the_fix(tmp_path: Path) -> None:
    def keys(w: Any) -> None:
        w.add_uint16("split.no", 0)
        w.add_uint16("split.count", 2)

    p = one_tensor_gguf(tmp_path / "m-00001-of-00002.gguf", keys)
    r = run("inspect", str(p))
    assert r.exit_code == 2
    assert "split GGUF (2 parts)" in r.stderr and "llama-gguf-split --merge" in r.stderr


def test_a_long_key_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    def keys(w: Any) -> None:
        w.add_uint32("k" * 70000, 1)

    p = one_tensor_gguf(tmp_path / "m.gguf", keys)
    r = run("inspect", str(p))
    assert r.exit_code == 2 and "a metadata key is 70000 bytes long" in r.stderr
    assert len(r.stderr) < 300


def test_gguf_magic_without_the_suffix(tmp_path: Path) -> None:
    p = write_gguf(tmp_path / "m.gguf", head="copy")
    q = p.rename(tmp_path / "model.weights")
    d = doc("inspect", str(q))
    assert d["format"] == "gguf" and d["dedupable_bytes"] > 0


def test_unknown_architecture_is_noted_and_left_alone(tmp_path: Path) -> None:
    p = write_gguf(tmp_path / "m.gguf", arch="not-an-arch", head="copy")
    d = doc("inspect", str(p))
    assert any("not in tiecli's llama.cpp table" in n for n in d["notes"])
    assert all("declared" not in t["evidence"] for t in d["ties"])
    before = sha(p)
    r = doc("dedupe", str(p), "--by-value", "--min-bytes", "0")
    assert r["removed"] == [] and sha(p) == before


def test_a_bad_write_is_caught_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The written file is read back with GGUFReader and compared; a flipped byte
    fails the run (exit 1) and leaves the input as it was."""
    import tiecli.io.writes as writes

    p = write_gguf(tmp_path / "m.gguf", head="copy")
    before = sha(p)
    real = writes.copy_range

    def flipped(src, dst, src_off, dst_off, count, *args):  # type: ignore[no-untyped-def]
        real(src, dst, src_off, dst_off, count, *args)
        import os

        byte = os.pread(src, 1, src_off)
        os.pwrite(dst, bytes([byte[0] ^ 1]), dst_off)

    monkeypatch.setattr(writes, "copy_range", flipped)
    r = run("dedupe", str(p))
    assert r.exit_code == 1, r.output
    assert "verification failed" in r.stderr and "does not equal" in r.stderr
    assert sha(p) == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.gguf"]


def test_changed_metadata_is_caught_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tiecli.io.writes as writes

    p = write_gguf(tmp_path / "m.gguf", head="copy")
    before = sha(p)
    real = writes.write_all

    def renamed(fd, data, offset):  # type: ignore[no-untyped-def]
        return real(fd, bytes(data).replace(b"tiny", b"tinz"), offset)

    monkeypatch.setattr(writes, "write_all", renamed)
    r = run("dedupe", str(p), "-o", str(tmp_path / "out.gguf"))
    assert r.exit_code == 1, r.output
    assert "its metadata differs" in r.stderr
    assert sha(p) == before and not (tmp_path / "out.gguf").exists()


def test_repeated_metadata_key_is_refused(tmp_path: Path) -> None:
    def keys(w: Any) -> None:
        w.add_uint32("general.aaaa", 1)
        w.add_uint32("general.bbbb", 2)

    p = one_tensor_gguf(tmp_path / "m.gguf", keys)
    p.write_bytes(p.read_bytes().replace(b"general.bbbb", b"general.aaaa"))
    r = run("inspect", str(p))
    assert r.exit_code == 2 and "names metadata key 'general.aaaa' twice" in r.stderr


def test_forward_and_conversion_are_refused(tmp_path: Path) -> None:
    p = write_gguf(tmp_path / "m.gguf", head="copy")
    before = sha(p)
    r = run("dedupe", str(p), "--to", "safetensors", "-o", str(tmp_path / "x.safetensors"))
    assert r.exit_code == 2 and "GGUF" in r.stderr
    assert not (tmp_path / "x.safetensors").exists()
    r = run("verify", str(p), "--forward")
    assert r.exit_code == 2 and "GGUF" in r.stderr
    assert sha(p) == before


# -- the generator ------------------------------------------------------------

ARCH_CPP = """
static const std::map<llm_arch, const char *> LLM_ARCH_NAMES = {
    { LLM_ARCH_LLAMA,   "llama"   },
    { LLM_ARCH_GEMMA,   "gemma"   },
    { LLM_ARCH_OLMO2,   "olmo2"   },
    { LLM_ARCH_BERT,    "bert"    },
    { LLM_ARCH_EAGLE,   "eagle"   },
};
"""
LLAMA_BODY = """
    tok_embd = create_tensor(tn(LLM_TENSOR_TOKEN_EMBD, "weight"), {n_embd, n_vocab}, 0);
    output = create_tensor(tn(LLM_TENSOR_OUTPUT, "weight"), {n_embd, n_vocab}, TENSOR_NOT_REQUIRED);
    // if output is NULL, init from the input tok embed
    if (output == NULL) {
        output = create_tensor(tn(LLM_TENSOR_TOKEN_EMBD, "weight"), {n_embd, n_vocab}, TENSOR_DUPLICATED);
    }
"""
GEMMA_BODY = """
    tok_embd = create_tensor(tn(LLM_TENSOR_TOKEN_EMBD, "weight"), {n_embd, n_vocab}, 0);
    output = create_tensor(tn(LLM_TENSOR_TOKEN_EMBD, "weight"), {n_embd, n_vocab}, TENSOR_DUPLICATED);
"""
OLMO2_BODY = """
    output = create_tensor(tn(LLM_TENSOR_OUTPUT, "weight"), {n_embd, n_vocab}, 0);
"""
BERT_BODY = """
    tok_embd = create_tensor(tn(LLM_TENSOR_TOKEN_EMBD, "weight"), {n_embd, n_vocab}, 0);
"""
EAGLE_BODY = """
    output = create_tensor(tn(LLM_TENSOR_OUTPUT, "weight"), {n_embd, n_vocab}, TENSOR_NOT_REQUIRED);
"""
WANT = {
    "llama": "falls-back",
    "gemma": "always-tied",
    "olmo2": "required",
    "bert": "no-head",
    "eagle": "optional",
}


def _generate(tree: Path) -> dict:
    import subprocess
    import sys

    from helpers import ROOT

    out = subprocess.run(
        [sys.executable, str(ROOT / "tools/gguf_fallback.py"), str(tree), "--source", "test"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_generator_reads_the_switch_layout(tmp_path: Path) -> None:
    src = tmp_path / "llama.cpp/src"
    src.mkdir(parents=True)
    (src / "llama-arch.cpp").write_text(ARCH_CPP)
    cases = "".join(
        f"        case LLM_ARCH_{arch.upper()}:\n            {{{body}            }} break;\n"
        for arch, body in [
            ("llama", LLAMA_BODY),
            ("gemma", GEMMA_BODY),
            ("olmo2", OLMO2_BODY),
            ("bert", BERT_BODY),
            ("eagle", EAGLE_BODY),
        ]
    )
    (src / "llama-model.cpp").write_text(
        "bool llama_model::load_tensors(llama_model_loader & ml) {\n"
        f"    switch (arch) {{\n{cases}        default: throw;\n    }}\n    return true;\n}}\n"
    )
    doc = _generate(tmp_path / "llama.cpp")
    assert doc["architectures"] == WANT
    assert doc["source"]["path"] == "src/llama-model.cpp load_tensors"


def test_generator_reads_the_per_model_layout(tmp_path: Path) -> None:
    src = tmp_path / "llama.cpp/src"
    (src / "models").mkdir(parents=True)
    (src / "llama-arch.cpp").write_text(ARCH_CPP)
    classes = {"llama": "llama", "gemma": "gemma", "olmo2": "olmo2", "bert": "bert"}
    factory = "".join(
        f"        case LLM_ARCH_{a.upper()}:\n            return new llama_model_{c}(params);\n"
        for a, c in classes.items()
    )
    # eagle inherits llama's loader, with nothing of its own
    factory += "        case LLM_ARCH_EAGLE:\n            return new llama_model_eagle(params);\n"
    (src / "llama-model.cpp").write_text(f"switch (arch) {{\n{factory}}}\n")
    (src / "models/models.h").write_text(
        "struct llama_model_llama : public llama_model_base {};\n"
        "struct llama_model_eagle : public llama_model_llama {};\n"
    )
    for arch, body in [
        ("llama", LLAMA_BODY),
        ("gemma", GEMMA_BODY),
        ("olmo2", OLMO2_BODY),
        ("bert", BERT_BODY),
    ]:
        (src / f"models/{arch}.cpp").write_text(
            f"void llama_model_{arch}::load_arch_tensors(llama_model_loader &) {{{body}}}\n"
        )
    doc = _generate(tmp_path / "llama.cpp")
    assert doc["architectures"] == WANT | {"eagle": "falls-back"}
