"""Generate tiecli/data/gguf_heads.json from llama.cpp's sources.

llama.cpp has no tie record in GGUF: a tied head is ``output.weight`` left out,
and each architecture's loader decides what that means. This script reads each
architecture's ``load_tensors`` code and writes down, per ``general.architecture``
name, what its loader does with ``output.weight``:

- ``falls-back``: ``output.weight`` is optional (``TENSOR_NOT_REQUIRED``) and, when
  absent, the head is ``token_embd.weight`` (``TENSOR_DUPLICATED``): a tie;
- ``always-tied``: the loader never reads ``output.weight``; the head is always
  ``token_embd.weight`` (Gemma);
- ``required``: ``output.weight`` must be present; no fall-back;
- ``optional``: ``output.weight`` may be absent and nothing replaces it;
- ``no-head``: the loader reads no output head at all (encoders, embedders).

Usage (the sources come from the llama-cpp-python sdist, which vendors llama.cpp)::

    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/llsrc
    tar xzf /tmp/llsrc/llama_cpp_python-*.tar.gz -C /tmp/llsrc
    python tools/gguf_fallback.py /tmp/llsrc/llama_cpp_python-*/vendor/llama.cpp \\
        --source "llama-cpp-python 0.3.36 sdist (vendor/llama.cpp)" > tiecli/data/gguf_heads.json

Both layouts of llama.cpp are read: the older one, where ``src/llama-model.cpp``'s
``load_tensors`` switches on the architecture (``case LLM_ARCH_LLAMA: ...``), and the
newer one, where ``src/llama-model.cpp`` maps each architecture to a class
(``case LLM_ARCH_LLAMA: return new llama_model_llama(params);``) whose
``load_arch_tensors`` lives in ``src/models/*.cpp`` (inherited from its base class
in ``src/models/models.h`` when it has none of its own). Architecture names come
from ``LLM_ARCH_NAMES`` in ``src/llama-arch.cpp``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

OUTPUT_RE = re.compile(r'create_tensor\s*\(\s*tn\s*\(\s*LLM_TENSOR_OUTPUT\s*,\s*"weight"[^;]*;')
EMBD_DUP_RE = re.compile(
    r'create_tensor\s*\(\s*tn\s*\(\s*LLM_TENSOR_TOKEN_EMBD\s*,\s*"weight"[^;]*TENSOR_DUPLICATED[^;]*;'
)
NULL_TEST_RE = re.compile(r"if\s*\(\s*(?:output\s*==\s*(?:NULL|nullptr)|!\s*output)\s*\)")


def arch_names(src: Path) -> dict[str, str]:
    """``LLM_ARCH_X`` -> ``"x"`` from llama-arch.cpp's ``LLM_ARCH_NAMES``."""
    text = (src / "llama-arch.cpp").read_text()
    start = text.index("LLM_ARCH_NAMES")
    block = text[start : text.index("};", start)]
    return dict(re.findall(r"\{\s*(LLM_ARCH_\w+)\s*,\s*\"([^\"]+)\"\s*\}", block))


def function_body(text: str, at: int) -> str:
    """The brace-balanced block starting at the first ``{`` from ``at``."""
    open_at = text.index("{", at)
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at : i + 1]
    return text[open_at:]


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def classify(body: str) -> str:
    outputs = OUTPUT_RE.findall(body)
    if not outputs:
        return (
            "always-tied"
            if re.search(r"\boutput\s*=\s*" + EMBD_DUP_RE.pattern, body)
            else "no-head"
        )
    optional = all("TENSOR_NOT_REQUIRED" in o for o in outputs)
    if not optional:
        return "required"
    test = NULL_TEST_RE.search(body)
    if test and EMBD_DUP_RE.search(body, test.end()):
        return "falls-back"
    return "optional"


def new_layout(src: Path, names: dict[str, str]) -> dict[str, str] | None:
    """Per-architecture classes (``src/models``); None when the sources predate them."""
    models = src / "models"
    model_cpp = strip_comments((src / "llama-model.cpp").read_text())
    factory = re.findall(
        r"((?:case\s+LLM_ARCH_\w+\s*:\s*)+)return\s+new\s+(llama_model_\w+)\s*\(", model_cpp
    )
    if not models.is_dir() or not factory:
        return None
    bodies: dict[str, str] = {}
    for cpp in sorted(models.glob("*.cpp")):
        text = strip_comments(cpp.read_text())
        for m in re.finditer(r"void\s+(llama_model_\w+)::load_arch_tensors\s*\(", text):
            bodies[m.group(1)] = function_body(text, m.end())
    header = strip_comments((models / "models.h").read_text())
    parents = dict(
        re.findall(r"struct\s+(llama_model_\w+)\s*:\s*public\s+(llama_model_\w+)", header)
    )
    out: dict[str, str] = {}
    for labels, cls in factory:
        seen = cls
        while seen not in bodies and seen in parents:
            seen = parents[seen]
        body = bodies.get(seen)
        if body is None:
            continue
        # a body that calls its base class's loader inherits what that one reads
        for base in re.findall(r"(llama_model_\w+)::load_arch_tensors\s*\(", body):
            body += bodies.get(base, "")
        for arch in re.findall(r"LLM_ARCH_\w+", labels):
            if arch in names:
                out[names[arch]] = classify(body)
    return out


def old_layout(src: Path, names: dict[str, str]) -> dict[str, str]:
    """One ``switch (arch)`` in ``load_tensors`` of llama-model.cpp."""
    text = strip_comments((src / "llama-model.cpp").read_text())
    at = re.search(r"bool\s+llama_model\w*::load_tensors\s*\(", text)
    if at is None:
        raise SystemExit("no load_tensors in llama-model.cpp: not a llama.cpp source tree?")
    body = function_body(text, at.end())
    out: dict[str, str] = {}
    parts = re.split(r"((?:case\s+LLM_ARCH_\w+\s*:\s*)+)", body)
    for labels, code in zip(parts[1::2], parts[2::2], strict=True):
        for arch in re.findall(r"LLM_ARCH_\w+", labels):
            if arch in names:
                out[names[arch]] = classify(code)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("llama_cpp", type=Path, help="a llama.cpp source tree (holding src/)")
    ap.add_argument("--source", required=True, help="where the tree came from, with its version")
    ap.add_argument("--commit", default=None, help="the llama.cpp commit, when known")
    args = ap.parse_args(argv)
    src = args.llama_cpp / "src"
    names = arch_names(src)
    table = new_layout(src, names)
    layout = "src/llama-model.cpp (factory) + src/models/*.cpp load_arch_tensors"
    if table is None:
        table = old_layout(src, names)
        layout = "src/llama-model.cpp load_tensors"
    doc = {
        "about": (
            "What llama.cpp's loader does with output.weight, per general.architecture; "
            "generated by tools/gguf_fallback.py, do not edit by hand"
        ),
        "source": {
            "repo": "ggml-org/llama.cpp",
            "from": args.source,
            "commit": args.commit,
            "path": layout,
        },
        "kinds": {
            "falls-back": "output.weight optional; absent, the head is token_embd.weight (a tie)",
            "always-tied": "output.weight never read; the head is always token_embd.weight",
            "required": "output.weight must be present",
            "optional": "output.weight may be absent; nothing replaces it",
            "no-head": "no output head is read",
        },
        "architectures": dict(sorted(table.items())),
    }
    json.dump(doc, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
