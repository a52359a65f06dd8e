"""A corpus of broken (and a few odd but valid) checkpoints for the bad-input tests.

``build_corpus(root)`` writes every case into its own folder ``root/<id>/`` and
returns the cases; ``SPECS`` lists them without building anything, so tests can
be parametrized at collection time. Each case names the path to hand to tiecli
and the file or folder the one-line error must name (its ``culprit``).

Every builder writes only inside its case folder: a run that leaves a new file
there, or changes one, has written beside its input. Code-execution payloads
aim at ``<case folder>/PWNED``, which must never appear.
"""

from __future__ import annotations

import builtins
import json
import os
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER = "PWNED"  # what a pickle payload would create in its case folder


@dataclass(frozen=True)
class Case:
    id: str
    path: Path  # what to pass to tiecli: a file or folder under ``folder`` (may not exist)
    description: str
    folder: Path  # the case's own folder, checked for changes and new files
    culprit: str  # the name the error line must mention
    exit_codes: tuple[int, ...] = (2,)
    known_bug: str | None = None
    refused_rewrite: bool = False  # readable, but dedupe/untie must refuse it (exit 2)

    @property
    def marker(self) -> Path:
        return self.folder / MARKER


Built = Path | tuple[Path, str]  # the path, or the path and its culprit's name


@dataclass(frozen=True)
class Spec:
    id: str
    description: str
    build: Callable[[Path], Built]
    exit_codes: tuple[int, ...] = (2,)
    known_bug: str | None = None  # an open bug outside the format readers
    bug_in: tuple[str, ...] = ("*",)  # where it shows: fnmatch patterns of "<command>/<human|json>"
    refused_rewrite: bool = False  # readable, but dedupe/untie must refuse it (exit 2)


SPECS: list[Spec] = []


def case(
    id: str,
    description: str,
    *,
    exit_codes: tuple[int, ...] = (2,),
    known_bug: str | None = None,
    bug_in: tuple[str, ...] = ("*",),
    refused_rewrite: bool = False,
) -> Callable[[Callable[[Path], Built]], Callable[[Path], Built]]:
    def register(build: Callable[[Path], Built]) -> Callable[[Path], Built]:
        assert all(s.id != id for s in SPECS), id
        SPECS.append(Spec(id, description, build, exit_codes, known_bug, bug_in, refused_rewrite))
        return build

    return register


def build_corpus(root: Path) -> list[Case]:
    cases = []
    for spec in SPECS:
        folder = root / spec.id
        folder.mkdir(parents=True)
        built = spec.build(folder)
        path, culprit = built if isinstance(built, tuple) else (built, built.name)
        cases.append(
            Case(
                spec.id,
                path,
                spec.description,
                folder,
                culprit,
                spec.exit_codes,
                spec.known_bug,
                spec.refused_rewrite,
            )
        )
    return cases


# ----------------------------------------------------------------- safetensors bytes
def floats(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


DATA = floats(*range(1, 7)) + floats(10, 20, 30, 40)  # a: 2x3, b: 4 (40 bytes)


def good_header() -> dict[str, Any]:
    return {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]},
    }


def st_bytes(
    header: Any = None, data: bytes = DATA, *, raw: bytes | None = None, length: int | None = None
) -> bytes:
    """A safetensors file: 8-byte length, header text, data. ``raw`` replaces the JSON."""
    text = (
        raw
        if raw is not None
        else json.dumps(header if header is not None else good_header()).encode()
    )
    n = len(text) if length is None else length
    return struct.pack("<Q", n) + text + data


def with_entry(name: str, **fields: Any) -> dict[str, Any]:
    """The good header with some fields of one entry replaced (``None`` deletes one)."""
    h = good_header()
    for key, value in fields.items():
        if value is _DELETE:
            del h[name][key]
        else:
            h[name][key] = value
    return h


_DELETE = object()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def st(d: Path, data: bytes, name: str = "model.safetensors") -> Path:
    return write(d / name, data)


def st_header(d: Path, header: Any) -> Path:
    return st(d, st_bytes(header))


LFS_POINTER = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    b"size 548105171\n"
)


# ----------------------------------------------------------------- paths
@case("missing-file", "a .safetensors path that does not exist")
def _(d: Path) -> Built:
    return d / "missing.safetensors"


@case("missing-folder", "a folder path that does not exist")
def _(d: Path) -> Built:
    return d / "no-such-model"


@case("missing-pt", "a .pt path that does not exist")
def _(d: Path) -> Built:
    return d / "missing.pt"


# ----------------------------------------------------------------- safetensors: size and length
@case("empty-file", "a 0-byte .safetensors file")
def _(d: Path) -> Built:
    return st(d, b"")


@case("short-file", "5 bytes, too short for the 8-byte header length")
def _(d: Path) -> Built:
    return st(d, b"\x05\x00\x00\x00\x00")


@case("seven-bytes", "7 bytes, one short of a header length")
def _(d: Path) -> Built:
    return st(d, b"\x02\x00\x00\x00\x00\x00\x00")


@case("length-only", "exactly 8 bytes: a header length of 2 and nothing after it")
def _(d: Path) -> Built:
    return st(d, struct.pack("<Q", 2))


@case("truncated-data", "valid header, data section cut short by 10 bytes")
def _(d: Path) -> Built:
    return st(d, st_bytes()[:-10])


@case("truncated-header", "file cut inside the JSON header")
def _(d: Path) -> Built:
    return st(d, st_bytes()[:40])


@case("header-length-beyond-file", "header length 1000 bytes past the end of the file")
def _(d: Path) -> Built:
    return st(d, st_bytes(length=len(json.dumps(good_header())) + 1000))


@case("header-length-2p63", "header length 2**63")
def _(d: Path) -> Built:
    return st(d, st_bytes(length=2**63))


@case("header-length-max", "header length 2**64-1")
def _(d: Path) -> Built:
    return st(d, st_bytes(length=2**64 - 1))


@case("header-length-zero", "header length 0: an empty header")
def _(d: Path) -> Built:
    return st(d, st_bytes(raw=b""))


@case("header-length-short", "header length one byte short: the JSON is cut off")
def _(d: Path) -> Built:
    return st(d, st_bytes(length=len(json.dumps(good_header())) - 1))


# ----------------------------------------------------------------- safetensors: header text
@case("header-not-json", "header bytes that are not JSON")
def _(d: Path) -> Built:
    return st(d, st_bytes(raw=b"this is not json at all"))


@case("header-json-list", "header is a JSON list")
def _(d: Path) -> Built:
    return st(d, st_bytes([1, 2, 3]))


@case("header-json-number", "header is a JSON number")
def _(d: Path) -> Built:
    return st(d, st_bytes(42))


@case("header-json-string", "header is a JSON string")
def _(d: Path) -> Built:
    return st(d, st_bytes("a"))


@case("header-json-null", "header is JSON null")
def _(d: Path) -> Built:
    return st(d, st_bytes(raw=b"null"))


@case("header-invalid-utf8", "header with a byte that is not UTF-8 in a tensor name")
def _(d: Path) -> Built:
    raw = json.dumps(good_header()).encode().replace(b'"a"', b'"a\xff"')
    return st(d, st_bytes(raw=raw))


@case("header-deep-nesting", "header of 100000 nested lists (recursion limit)")
def _(d: Path) -> Built:
    return st(d, st_bytes(raw=b"[" * 100_000 + b"]" * 100_000))


@case("header-nul-bytes", "header of NUL bytes")
def _(d: Path) -> Built:
    return st(d, st_bytes(raw=b"\x00" * 64))


@case("duplicate-tensor", "header names tensor 'a' twice")
def _(d: Path) -> Built:
    raw = (
        b'{"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},'
        b' "a": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]}}'
    )
    return st(d, st_bytes(raw=raw))


@case("duplicate-metadata", "header holds two __metadata__ objects")
def _(d: Path) -> Built:
    raw = (
        b'{"__metadata__": {"format": "pt"}, "__metadata__": {"lm_head.weight": "a"},'
        b' "a": {"dtype": "F32", "shape": [10], "data_offsets": [0, 40]}}'
    )
    return st(d, st_bytes(raw=raw))


@case("duplicate-entry-key", "a tensor entry names 'dtype' twice")
def _(d: Path) -> Built:
    raw = b'{"a": {"dtype": "F32", "dtype": "F16", "shape": [10], "data_offsets": [0, 40]}}'
    return st(d, st_bytes(raw=raw))


# ----------------------------------------------------------------- safetensors: entries
@case("unknown-dtype", "dtype 'F128'")
def _(d: Path) -> Built:
    return st_header(d, with_entry("a", dtype="F128"))


@case("dtype-lowercase", "dtype 'float32' (torch's name, not safetensors')")
def _(d: Path) -> Built:
    return st_header(d, with_entry("a", dtype="float32"))


@case("dtype-list", "dtype is a list (unhashable)")
def _(d: Path) -> Built:
    return st_header(d, with_entry("a", dtype=["F32"]))


@case("dtype-object", "dtype is an object (unhashable)")
def _(d: Path) -> Built:
    return st_header(d, with_entry("a", dtype={"F32": 1}))


@case("dtype-missing", "entry without dtype")
def _(d: Path) -> Built:
    return st_header(d, with_entry("a", dtype=_DELETE))


@case("shape-negative", "shape [2, -3]")
def _(d: Path) -> Built:
    return st_header(d, with_entry("a", shape=[2, -3]))


@case("shape-float", "shape [2.0, 3]")
def _(d: Path) -> Built:
    return st_header(d, with_entry("a", shape=[2.0, 3]))


@case("shape-bool", "shape [true, 6]")
def _(d: Path) -> Built:
    return st_header(d, with_entry("a", shape=[True, 6]))


@case("shape-string", "shape '2x3'")
def _(d: Path) -> Built:
    return st_header(d, with_entry("a", shape="2x3"))


@case("shape-number", "shape 6 instead of [6]")
def _(d: Path) -> Built:
    return st_header(d, with_entry("a", shape=6))


@case("shape-nested", "shape [[2, 3]]")
def _(d: Path) -> Built:
    return st_header(d, with_entry("a", shape=[[2, 3]]))


@case("shape-missing", "entry without shape")
def _(d: Path) -> Built:
    return st_header(d, with_entry("a", shape=_DELETE))


@case("shape-huge", "shape [2**40, 2**40] over 24 bytes")
def _(d: Path) -> Built:
    return st_header(d, with_entry("a", shape=[2**40, 2**40]))


@case("offsets-out-of-range", "data_offsets end 4000 bytes into a 40-byte data section")
def _(d: Path) -> Built:
    return st_header(d, with_entry("b", data_offsets=[24, 4000]))


@case("offsets-huge", "data_offsets [0, 10**30]")
def _(d: Path) -> Built:
    return st_header(d, with_entry("a", data_offsets=[0, 10**30]))


@case("offsets-reversed", "data_offsets [40, 24] (start > end)")
def _(d: Path) -> Built:
    return st_header(d, with_entry("b", data_offsets=[40, 24]))


@case("offsets-negative", "data_offsets [-24, 0]")
def _(d: Path) -> Built:
    return st_header(d, with_entry("a", data_offsets=[-24, 0]))


@case("offsets-single", "data_offsets [24], not a pair")
def _(d: Path) -> Built:
    return st_header(d, with_entry("b", data_offsets=[24]))


@case("offsets-triple", "data_offsets [0, 12, 24], not a pair")
def _(d: Path) -> Built:
    return st_header(d, with_entry("a", data_offsets=[0, 12, 24]))


@case("offsets-float", "data_offsets [0.0, 24.0]")
def _(d: Path) -> Built:
    return st_header(d, with_entry("a", data_offsets=[0.0, 24.0]))


@case("offsets-string", "data_offsets '0-24'")
def _(d: Path) -> Built:
    return st_header(d, with_entry("a", data_offsets="0-24"))


@case("offsets-missing", "entry without data_offsets")
def _(d: Path) -> Built:
    return st_header(d, with_entry("a", data_offsets=_DELETE))


@case("offsets-overlap", "b's bytes [16, 32] overlap a's [0, 24]")
def _(d: Path) -> Built:
    return st_header(d, with_entry("b", data_offsets=[16, 32]))


@case("offsets-aliased", "two names over one byte range (what safetensors refuses to write)")
def _(d: Path) -> Built:
    h = good_header()
    h["b"] = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    return st(d, st_bytes(h, DATA[:24]))


@case("offsets-size-mismatch", "shape [2, 3] of F32 (24 bytes) over 20 bytes")
def _(d: Path) -> Built:
    h = with_entry("a", data_offsets=[0, 20])
    h["b"]["data_offsets"] = [20, 36]
    return st(d, st_bytes(h, DATA[:36]))


@case("dtype-size-mismatch", "dtype F16 over F32-sized data")
def _(d: Path) -> Built:
    return st_header(d, with_entry("a", dtype="F16"))


@case("subbyte-partial", "3 F4 elements: 12 bits, not whole bytes")
def _(d: Path) -> Built:
    h = {"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}
    return st(d, st_bytes(h, b"\x00\x00"))


@case("metadata-list", "__metadata__ is a list")
def _(d: Path) -> Built:
    h = good_header()
    h["__metadata__"] = ["format", "pt"]
    return st_header(d, h)


@case("metadata-string", "__metadata__ is a string")
def _(d: Path) -> Built:
    h = good_header()
    h["__metadata__"] = "pt"
    return st_header(d, h)


@case("metadata-non-string-value", "__metadata__ value is a number")
def _(d: Path) -> Built:
    h = good_header()
    h["__metadata__"] = {"format": 1}
    return st_header(d, h)


@case("metadata-nested-value", "__metadata__ value is an object")
def _(d: Path) -> Built:
    h = good_header()
    h["__metadata__"] = {"lm_head.weight": {"source": "a"}}
    return st_header(d, h)


@case("entry-list", "tensor entry is a list")
def _(d: Path) -> Built:
    h = good_header()
    h["a"] = ["F32", [2, 3], [0, 24]]
    return st_header(d, h)


@case("entry-null", "tensor entry is null")
def _(d: Path) -> Built:
    h = good_header()
    h["a"] = None
    return st_header(d, h)


@case("entry-string", "tensor entry is a string")
def _(d: Path) -> Built:
    h = good_header()
    h["a"] = "F32"
    return st_header(d, h)


@case("lfs-pointer", "a Git LFS pointer saved as model.safetensors (weights never pulled)")
def _(d: Path) -> Built:
    return st(d, LFS_POINTER)


@case("zip-named-safetensors", "a PyTorch zip checkpoint named .safetensors")
def _(d: Path) -> Built:
    return st(d, pt_bytes({"w": _torch().ones(3)}))


@case(
    "unknown-extension-garbage", "text in a file with an unknown extension (sniffed as safetensors)"
)
def _(d: Path) -> Built:
    return write(d / "weights.dat", b"hello, I am not a checkpoint\n" * 4)


@case("path-is-folder-named-safetensors", "a folder named model.safetensors holding nothing")
def _(d: Path) -> Built:
    p = d / "model.safetensors"
    p.mkdir()
    return p


# ----------------------------------------------------------------- sharded safetensors
def shard_bytes(name: str, values: tuple[float, ...]) -> bytes:
    h = {name: {"dtype": "F32", "shape": [len(values)], "data_offsets": [0, 4 * len(values)]}}
    return st_bytes(h, floats(*values))


INDEX = "model.safetensors.index.json"
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


def sharded(
    d: Path, index: Any = None, *, raw: bytes | None = None, shards: dict[str, bytes] | None = None
) -> Path:
    """A two-shard checkpoint in ``d``; returns the index path."""
    if shards is None:
        shards = {SHARD1: shard_bytes("a", (1.0, 2.0)), SHARD2: shard_bytes("b", (3.0, 4.0))}
    for name, data in shards.items():
        write(d / name, data)
    if index is None:
        index = {"metadata": {"total_size": 16}, "weight_map": {"a": SHARD1, "b": SHARD2}}
    return write(d / INDEX, raw if raw is not None else json.dumps(index).encode())


@case("index-not-json", "index file that is not JSON")
def _(d: Path) -> Built:
    return sharded(d, raw=b"{weight_map: nope")


@case("index-invalid-utf8", "index file with bytes that are not UTF-8")
def _(d: Path) -> Built:
    return sharded(d, raw=b'{"weight_map": {"a\xff": "x"}}')


@case("index-json-list", "index is a JSON list")
def _(d: Path) -> Built:
    return sharded(d, [SHARD1, SHARD2])


@case("index-no-weight-map", "index without weight_map")
def _(d: Path) -> Built:
    return sharded(d, {"metadata": {"total_size": 16}})


@case("index-weight-map-list", "weight_map is a list")
def _(d: Path) -> Built:
    return sharded(d, {"weight_map": [["a", SHARD1], ["b", SHARD2]]})


@case("index-weight-map-non-string", "weight_map maps a tensor to a number")
def _(d: Path) -> Built:
    return sharded(d, {"weight_map": {"a": 1, "b": SHARD2}})


@case("index-metadata-list", "index metadata is a list")
def _(d: Path) -> Built:
    return sharded(d, {"metadata": [16], "weight_map": {"a": SHARD1, "b": SHARD2}})


@case("index-duplicate-tensor", "weight_map names tensor 'a' twice, in two shards")
def _(d: Path) -> Built:
    raw = json.dumps({"weight_map": {"a": SHARD1, "b": SHARD2}}).encode()
    raw = raw.replace(b'"a": ', f'"a": "{SHARD2}", "a": '.encode())
    return sharded(d, raw=raw)


@case("index-missing-shard", "index names a shard that does not exist (path: the folder)")
def _(d: Path) -> Built:
    sharded(d, shards={SHARD1: shard_bytes("a", (1.0, 2.0))})
    return d, INDEX


@case("index-tensor-absent", "index maps tensor 'c' to a shard that does not hold it")
def _(d: Path) -> Built:
    return sharded(d, {"weight_map": {"a": SHARD1, "b": SHARD2, "c": SHARD2}})


@case(
    "index-shard-escapes", "index names '../outside.safetensors', a valid file outside its folder"
)
def _(d: Path) -> Built:
    write(d / "outside.safetensors", shard_bytes("a", (1.0, 2.0)))
    return sharded(d / "model", {"weight_map": {"a": "../outside.safetensors"}})


@case("index-shard-absolute", "index names a shard by an absolute path to a valid file")
def _(d: Path) -> Built:
    outside = write(d / "outside.safetensors", shard_bytes("a", (1.0, 2.0)))
    return sharded(d / "model", {"weight_map": {"a": str(outside.resolve())}})


@case("index-shard-empty-name", "index names a shard ''")
def _(d: Path) -> Built:
    return sharded(d, {"weight_map": {"a": "", "b": SHARD2}})


@case("index-shard-dot", "index names the shard '.' (its own folder)")
def _(d: Path) -> Built:
    return sharded(d, {"weight_map": {"a": ".", "b": SHARD2}})


@case("index-shard-is-folder", "index names a shard that is a folder")
def _(d: Path) -> Built:
    (d / "sub.safetensors").mkdir()
    return sharded(d, {"weight_map": {"a": "sub.safetensors", "b": SHARD2}})


@case("index-shard-nul", "index names a shard with a NUL byte in its name")
def _(d: Path) -> Built:
    return sharded(d, {"weight_map": {"a": "model\x00.safetensors", "b": SHARD2}})


@case("index-shard-empty", "one shard is an empty file (path: the index)")
def _(d: Path) -> Built:
    return sharded(d, shards={SHARD1: b"", SHARD2: shard_bytes("b", (3.0, 4.0))}), SHARD1


@case("index-shard-bad-header", "one shard's header is not JSON (path: the folder)")
def _(d: Path) -> Built:
    sharded(d, shards={SHARD1: shard_bytes("a", (1.0, 2.0)), SHARD2: st_bytes(raw=b"garbage!")})
    return d, SHARD2


@case("index-shard-truncated", "one shard's data is cut short")
def _(d: Path) -> Built:
    return sharded(
        d, shards={SHARD1: shard_bytes("a", (1.0, 2.0))[:-3], SHARD2: shard_bytes("b", (3.0, 4.0))}
    ), SHARD1


@case("pickle-index-missing-shard", "pytorch_model.bin.index.json naming a missing .bin")
def _(d: Path) -> Built:
    write(d / "pytorch_model-00001-of-00002.bin", pt_bytes({"a": _torch().ones(2)}))
    index = {
        "weight_map": {
            "a": "pytorch_model-00001-of-00002.bin",
            "b": "pytorch_model-00002-of-00002.bin",
        }
    }
    return write(d / "pytorch_model.bin.index.json", json.dumps(index).encode())


# ----------------------------------------------------------------- folders
CONFIG = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 8, "n_embd": 4}


def config(d: Path, data: bytes | None = None) -> None:
    write(d / "config.json", data if data is not None else json.dumps(CONFIG).encode())


@case("folder-empty", "an empty folder")
def _(d: Path) -> Built:
    (d / "model").mkdir()
    return d / "model"


@case("folder-config-only", "a folder with config.json and tokenizer files but no weights")
def _(d: Path) -> Built:
    m = d / "model"
    config(m)
    write(m / "tokenizer.json", b"{}")
    write(m / "README.md", b"# a model\n")
    return m


@case("folder-two-safetensors", "two unrelated .safetensors files and no index")
def _(d: Path) -> Built:
    st(d, shard_bytes("a", (1.0, 2.0)), "first.safetensors")
    st(d, shard_bytes("b", (1.0, 2.0)), "second.safetensors")
    return d


@case("folder-two-bins", "two unrelated .bin files and no index")
def _(d: Path) -> Built:
    torch = _torch()
    write(d / "first.bin", pt_bytes({"a": torch.ones(2)}))
    write(d / "second.bin", pt_bytes({"b": torch.ones(2)}))
    return d


@case("folder-config-not-json", "valid model.safetensors, config.json is not JSON")
def _(d: Path) -> Built:
    config(d, b"{model_type: gpt2")
    st(d, st_bytes())
    return d, "config.json"


@case("folder-config-list", "valid model.safetensors, config.json is a JSON list")
def _(d: Path) -> Built:
    config(d, b'["gpt2"]')
    st(d, st_bytes())
    return d, "config.json"


@case("folder-config-invalid-utf8", "valid model.safetensors, config.json is not UTF-8")
def _(d: Path) -> Built:
    config(d, b'{"model_type": "gpt2\xff"}')
    st(d, st_bytes())
    return d, "config.json"


@case("file-beside-bad-config", "a valid .safetensors file whose folder's config.json is not JSON")
def _(d: Path) -> Built:
    config(d, b"not json")
    return st(d, st_bytes()), "config.json"


@case("folder-broken-weights", "a Hugging Face folder whose model.safetensors is truncated")
def _(d: Path) -> Built:
    config(d)
    st(d, st_bytes()[:-4])
    return d, "model.safetensors"


# ----------------------------------------------------------------- PyTorch pickles
def _torch() -> Any:
    import torch

    return torch


def pt_bytes(obj: Any, **kwargs: Any) -> bytes:
    import io

    buf = io.BytesIO()
    _torch().save(obj, buf, **kwargs)
    return buf.getvalue()


def rezip(data: bytes, change: Callable[[str, bytes], bytes | None]) -> bytes:
    """A torch zip with each member passed through ``change`` (None drops it)."""
    import io

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
        for name in zin.namelist():
            member = change(name, zin.read(name))
            if member is not None:
                zout.writestr(name, member)
    return out.getvalue()


def state() -> dict[str, Any]:
    torch = _torch()
    return {"embed.weight": torch.arange(12.0).reshape(3, 4), "norm.weight": torch.ones(4)}


class Payload:
    """Unpickling this calls ``func(*args)``: what tiecli must never do."""

    def __init__(self, func: Any, *args: Any):
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (self.func, self.args)


@case("pt-empty", "a 0-byte pytorch_model.bin")
def _(d: Path) -> Built:
    return write(d / "pytorch_model.bin", b"")


@case("pt-legacy-pickle", "a non-zip legacy pickle (_use_new_zipfile_serialization=False)")
def _(d: Path) -> Built:
    return write(d / "pytorch_model.bin", pt_bytes(state(), _use_new_zipfile_serialization=False))


@case("pt-legacy-ckpt", "a non-zip legacy pickle named .ckpt, nested under state_dict")
def _(d: Path) -> Built:
    return write(
        d / "last.ckpt", pt_bytes({"state_dict": state()}, _use_new_zipfile_serialization=False)
    )


@case("pt-zip-not-torch", "a zip archive that is not a torch checkpoint")
def _(d: Path) -> Built:
    p = d / "model.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("readme.txt", "hello")
    return p


@case("pt-zip-garbage-pickle", "a torch-shaped zip whose data.pkl is not a pickle")
def _(d: Path) -> Built:
    data = rezip(
        pt_bytes(state()), lambda n, b: b"garbage, not a pickle" if n.endswith("data.pkl") else b
    )
    return write(d / "model.pt", data)


@case("pt-zip-empty-pickle", "a torch zip whose data.pkl is empty")
def _(d: Path) -> Built:
    return write(
        d / "model.pt", rezip(pt_bytes(state()), lambda n, b: b"" if n.endswith("data.pkl") else b)
    )


@case("pt-zip-pickle-cut", "a torch zip whose data.pkl lacks its last byte (STOP)")
def _(d: Path) -> Built:
    return write(
        d / "model.pt",
        rezip(pt_bytes(state()), lambda n, b: b[:-1] if n.endswith("data.pkl") else b),
    )


@case("pt-truncated-half", "a .bin cut in half")
def _(d: Path) -> Built:
    data = pt_bytes(state())
    return write(d / "pytorch_model.bin", data[: len(data) // 2])


@case("pt-truncated-tail", "a .bin missing its last 10 bytes (zip end record)")
def _(d: Path) -> Built:
    return write(d / "pytorch_model.bin", pt_bytes(state())[:-10])


@case("pt-missing-storage", "a torch zip with a tensor's data record removed")
def _(d: Path) -> Built:
    return write(
        d / "model.pt", rezip(pt_bytes(state()), lambda n, b: None if n.endswith("/data/0") else b)
    )


@case("pt-short-storage", "a torch zip whose data record is shorter than its tensor")
def _(d: Path) -> Built:
    return write(
        d / "model.pt", rezip(pt_bytes(state()), lambda n, b: b[:4] if n.endswith("/data/0") else b)
    )


@case("pt-payload-system", "a pickle whose unpickling calls os.system('touch PWNED')")
def _(d: Path) -> Built:
    obj = {**state(), "hook": Payload(os.system, f"touch {d / MARKER}")}
    return write(d / "pytorch_model.bin", pt_bytes(obj))


@case("pt-payload-open", "a pickle whose unpickling calls open('PWNED', 'w')")
def _(d: Path) -> Built:
    obj = {**state(), "hook": Payload(builtins.open, str(d / MARKER), "w")}
    return write(d / "model.pt", pt_bytes(obj))


@case("pt-payload-exec", "a pickle whose unpickling calls exec(...) inside a nested state dict")
def _(d: Path) -> Built:
    code = f"open({str(d / MARKER)!r}, 'w').close()"
    obj = {"state_dict": state(), "callbacks": [Payload(builtins.exec, code)]}
    return write(d / "last.ckpt", pt_bytes(obj))


@case(
    "pt-namespace-hparams",
    "a Lightning-style .ckpt holding an argparse.Namespace (not allow-listed)",
)
def _(d: Path) -> Built:
    import argparse

    obj = {"state_dict": state(), "hyper_parameters": argparse.Namespace(lr=0.1)}
    return write(d / "last.ckpt", pt_bytes(obj))


@case("pt-no-tensors", "a .pt whose top level is {'epoch': 3}")
def _(d: Path) -> Built:
    return write(d / "model.pt", pt_bytes({"epoch": 3}))


@case("pt-empty-dict", "a .pt holding an empty dict")
def _(d: Path) -> Built:
    return write(d / "model.pt", pt_bytes({}))


@case("pt-top-level-tensor", "a .pt holding one bare tensor")
def _(d: Path) -> Built:
    return write(d / "model.pt", pt_bytes(_torch().ones(3)))


@case("pt-top-level-list", "a .pt holding a list of tensors")
def _(d: Path) -> Built:
    return write(d / "model.pt", pt_bytes(list(state().values())))


@case("pt-int-keys", "a .pt holding {0: tensor}")
def _(d: Path) -> Built:
    return write(d / "model.pt", pt_bytes({0: _torch().ones(3)}))


@case("pt-sparse", "a .pt holding a sparse COO tensor")
def _(d: Path) -> Built:
    return write(d / "model.pt", pt_bytes({"w": _torch().eye(3).to_sparse()}))


@case("pt-meta", "a .pt holding tensors saved on the meta device (no data)")
def _(d: Path) -> Built:
    torch = _torch()
    return write(
        d / "model.pt",
        pt_bytes({"a": torch.empty(4, device="meta"), "b": torch.empty(4, device="meta")}),
    )


@case("pt-quantized", "a .pt holding a qint8 tensor")
def _(d: Path) -> Built:
    import warnings

    torch = _torch()
    with (
        warnings.catch_warnings()
    ):  # quantized tensors are deprecated: all the more reason to test them
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8)
    return write(d / "model.pt", pt_bytes({"w": q}))


@case("pt-complex128", "a .pt holding a complex128 tensor (no safetensors dtype)")
def _(d: Path) -> Built:
    torch = _torch()
    return write(d / "model.pt", pt_bytes({"w": torch.ones(3, dtype=torch.complex128)}))


@case("pt-is-safetensors", "a safetensors file named pytorch_model.bin")
def _(d: Path) -> Built:
    return write(d / "pytorch_model.bin", st_bytes())


@case("pt-text-file", "a text file named model.pt")
def _(d: Path) -> Built:
    return write(d / "model.pt", b"just some text\n")


@case("pt-lfs-pointer", "a Git LFS pointer saved as pytorch_model.bin")
def _(d: Path) -> Built:
    return write(d / "pytorch_model.bin", LFS_POINTER)


# ----------------------------------------------------------------- odd but readable (exit 0)
@case(
    "record-not-json",
    "valid tensors, a 'tiecli' record that is not JSON (a problem for inspect/verify; "
    "rewrites refuse to overwrite it)",
    exit_codes=(0,),
    refused_rewrite=True,
)
def _(d: Path) -> Built:
    h = good_header()
    h["__metadata__"]["tiecli"] = "{not json"
    return st_header(d, h)


@case(
    "record-dangling",
    "a record whose source is not stored",
    exit_codes=(0,),
    refused_rewrite=True,
)
def _(d: Path) -> Built:
    h = good_header()
    h["__metadata__"]["tiecli"] = json.dumps(
        {"version": 1, "ties": [{"alias": "c", "source": "zz"}]}
    )
    h["__metadata__"]["lm_head.weight"] = "nowhere"
    return st_header(d, h)


@case(
    "record-bad-fields",
    "a record with a list transform and a string evidence",
    exit_codes=(0,),
    refused_rewrite=True,
)
def _(d: Path) -> Built:
    h = good_header()
    ties = [
        {"alias": "c", "source": "a", "transform": ["x"]},
        {"alias": "e", "source": "a", "evidence": "abc"},
    ]
    h["__metadata__"]["tiecli"] = json.dumps({"version": 1, "ties": ties})
    return st_header(d, h)


@case("zero-tensors", "a safetensors file with an empty header object", exit_codes=(0,))
def _(d: Path) -> Built:
    return st(d, st_bytes({}, b""))


@case(
    "pt-expanded",
    "a .pt holding an expanded view (stride 0) of a 1-element storage",
    exit_codes=(0,),
)
def _(d: Path) -> Built:
    return write(d / "model.pt", pt_bytes({"w": _torch().zeros(1).expand(4)}))


@case(
    "markup-names",
    "valid tensors named like rich markup ('[/]', '[bold]x')",
    exit_codes=(0,),
)
def _(d: Path) -> Built:
    h = {
        "[/]": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "[bold]x": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]},
    }
    return st(d, st_bytes(h, floats(1, 2, 3, 4) * 2))


@case(
    "config-model-type-list",
    "config.json with model_type a list and tie_word_embeddings false",
    exit_codes=(0, 2),
)
def _(d: Path) -> Built:
    config(d, json.dumps({"model_type": ["gpt2"], "tie_word_embeddings": False}).encode())
    return st(d, st_bytes()), "config.json"


@case(
    "config-field-wrong-type",
    "config.json with n_embd 'abc' (transformers refuses the config)",
    exit_codes=(0, 2),
)
def _(d: Path) -> Built:
    config(d, json.dumps({**CONFIG, "n_embd": "abc"}).encode())
    return st(d, st_bytes()), "config.json"


@case(
    "config-architectures-not-strings",
    "config.json with architectures [5]",
    exit_codes=(0, 2),
)
def _(d: Path) -> Built:
    config(d, json.dumps({**CONFIG, "architectures": [5]}).encode())
    return st(d, st_bytes()), "config.json"


@case(
    "config-unknown-model-type",
    "config.json naming a model_type transformers does not know",
    exit_codes=(0,),
)
def _(d: Path) -> Built:
    config(
        d, json.dumps({"model_type": "no-such-model", "architectures": ["NoSuchModel"]}).encode()
    )
    return st(d, st_bytes()), "config.json"


CASE_IDS = [s.id for s in SPECS]
