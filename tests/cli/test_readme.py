"""README.md stays true: every command and flag it shows exists, every command is shown,
and every JSON field it names for a command is in that command's real JSON output."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import FIXTURES, ROOT, model_folder, run_json, small_tensor
from remote_server import serve
from safetensors.numpy import save_file

README = (ROOT / "README.md").read_text(encoding="utf-8")
# sections about other programs (benchmark scripts, the linters)
OTHER_PROGRAMS = ("Benchmarks", "Development")
# named beside the fields in a JSON passage, but values or names of something else
NOT_FIELDS = frozenset({"safetensors", "pytorch", "null", "copy", "trim", "drop", "cpu", "disk"})
FLAG = re.compile(r"(?<![\w-])(--?[a-z][a-z0-9-]*)")
INVOCATION = re.compile(r"(?:^|&&\s*|;\s*|\|\s*|bin/|-m\s+)tiecli\s+([a-z][\w-]*)")


# -- what the README shows ---------------------------------------------------------------


def sections(text: str) -> Iterator[tuple[str, str]]:
    """(title, body) of each ``## `` section."""
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        title, _, body = part.partition("\n")
        yield title.strip(), body


def spans(text: str) -> list[str]:
    """What the README shows as code: each line of a fenced block (a ``$ `` prompt
    dropped) and each inline span, in the sections about tiecli."""
    out: list[str] = []
    for title, body in sections(text):
        if title in OTHER_PROGRAMS:
            continue
        for block in re.findall(r"```[^\n]*\n(.*?)```", body, re.S):
            out += [line.strip().removeprefix("$ ") for line in block.splitlines()]
        prose = re.sub(r"```.*?```", "", body, flags=re.S)
        out += [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose)]
    return [s for s in out if s]


def invocations(text: str) -> list[tuple[str, list[str]]]:
    """Each ``tiecli <command> ...`` shown, with the flags written after it."""
    out = []
    for span in spans(text):
        found = list(INVOCATION.finditer(span))
        for i, m in enumerate(found):
            end = found[i + 1].start() if i + 1 < len(found) else len(span)
            rest = re.split(r"&&|;|\|(?!\s*-)", span[m.end() : end])[0]
            rest = re.sub(r"'[^']*'|\"[^\"]*\"", "", rest)  # quoted values: no flags
            out.append((m.group(1), FLAG.findall(rest)))
    return out


def bare_flags(text: str) -> list[str]:
    """Flags shown on their own (`--max-download N`), not after a command."""
    return [f for s in spans(text) if s.startswith("-") for f in FLAG.findall(s.split(" ")[0])]


def cli_options() -> dict[str, set[str]]:
    """The commands and each one's options, from the app itself ("" for the app's own)."""
    import typer

    from tiecli.cli import app

    group = typer.main.get_command(app)
    options = {"": {o for p in group.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}}
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        opts = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        options[name] = opts | {"--help"}
    return options


def unknown_commands(text: str) -> set[str]:
    return {c for c, _flags in invocations(text)} - set(cli_options())


def unknown_flags(text: str) -> set[str]:
    """``command flag`` for each flag shown after a command that lacks it, and each flag
    shown on its own that no command has."""
    options = cli_options()
    every = set().union(*options.values())
    bad = {
        f"{command} {flag}"
        for command, flags in invocations(text)
        if command in options
        for flag in flags
        if flag not in options[command] | options[""]
    }
    return bad | {f for f in bare_flags(text) if f not in every}


def json_fields(text: str) -> dict[str, set[str]]:
    """The JSON fields each command's section names, by command (``verify --forward`` apart).

    They are named in backticks in the sentences that speak of the JSON document."""
    out: dict[str, set[str]] = {}
    for part in re.split(r"^### ", text, flags=re.M)[1:]:
        head, _, body = part.partition("\n")
        m = re.match(r"`tiecli (\w+)([^`]*)`", head)
        if m is None:
            continue
        key = m.group(1) + (" --forward" if "--forward" in m.group(2).split() else "")
        body = body.split("\n## ")[0]
        names: set[str] = set()
        for sentence in re.split(r"(?<=[.)])\s+(?=[A-Z])|\n\s*- ", body):
            if not re.search(r"\bJSON\b|\bdocument\b|also `remote`", sentence):
                continue
            for token in re.findall(r"`([^`]+)`", sentence):
                name = token.split(": ")[0]
                if re.fullmatch(r"[a-z_][a-z0-9_]*", name) and name not in NOT_FIELDS:
                    names.add(name)
        out[key] = (names - set(cli_options())) | out.get(key, set())
    return out


def keys(doc: Any) -> set[str]:
    """Every key of a JSON document, at any depth."""
    if isinstance(doc, dict):
        return set(doc) | {k for v in doc.values() for k in keys(v)}
    if isinstance(doc, list):
        return {k for v in doc for k in keys(v)}
    return set()


def missing_fields(text: str, docs: dict[str, list[dict[str, Any]]]) -> set[str]:
    """``command field`` for each field the README names that the command's JSON lacks."""
    return {
        f"{command} {field}"
        for command, fields in json_fields(text).items()
        for field in fields - set().union(*map(keys, docs[command]))
    }


# -- what the commands print, on the shipped fixtures -------------------------------------


def _json(*args: object) -> dict[str, Any]:
    return run_json([*args, "--json", "-q"], (0, 1))[1]


def _padded(folder: Path, tied: bool) -> Path:
    """llama with 12 embedding rows, the head the first 10 of them."""
    e = small_tensor(0)
    config = {"model_type": "llama", "vocab_size": 10, "tie_word_embeddings": tied}
    tensors = {
        "model.embed_tokens.weight": torch.cat([e, small_tensor(1, rows=2)]),
        "lm_head.weight": e.clone(),
    }
    return model_folder(folder, config, tensors)


def _large_pair(folder: Path) -> Path:
    """Two equal 2 MiB tensors nobody declared: a remote run over --max-download samples them."""
    folder.mkdir(parents=True)
    big = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)
    save_file({"a.weight": big, "b.weight": big.copy()}, str(folder / "model.safetensors"))
    return folder / "model.safetensors"


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("readme")
    untied_config = shutil.copytree(FIXTURES / "llama-untied/hf", tmp / "untied-config")
    cfg = json.loads((untied_config / "config.json").read_text())
    (untied_config / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    with_link = shutil.copytree(FIXTURES / "gpt2/hf", tmp / "with-link")
    (with_link / "broken").symlink_to(tmp / "nowhere")
    _large_pair(tmp / "remote" / "pair")
    shutil.copytree(FIXTURES / "gpt2/hf", tmp / "remote" / "gpt2")
    out: dict[str, list[dict[str, Any]]] = {
        "inspect": [
            _json("inspect", FIXTURES / "gpt2/hf"),
            _json("inspect", FIXTURES / "drift"),
            _json("inspect", FIXTURES / "custom/nested/lightning.ckpt"),
            _json("inspect", _padded(tmp / "padded", tied=False)),
        ],
        "dedupe": [
            _json("dedupe", FIXTURES / "t5/full", "-o", tmp / "t5-deduped"),
            _json("dedupe", FIXTURES / "drift", "-o", tmp / "drift-out", "--dry-run"),
            _json("dedupe", with_link, "-o", tmp / "link-out"),
        ],
        "untie": [_json("untie", FIXTURES / "gpt2/hf", "-o", tmp / "gpt2-untied")],
        "fix": [
            _json("fix", untied_config),
            _json("fix", _padded(tmp / "padded-fix", tied=True), "--trim-padding"),
        ],
        "verify": [
            _json("verify", "--require-deduped", FIXTURES / "t5/full", tmp / "t5-deduped"),
            _json("verify", "--for", "transformers", FIXTURES / "gpt2/hf"),
        ],
        "verify --forward": [
            _json(
                "verify", "--forward", "--device", "cpu", *("--against", FIXTURES / "t5/full"),
                tmp / "t5-deduped",
            ),
            _json(
                "verify", "--forward", "--device-map", "auto",
                *("--max-memory", "cpu=20KB,disk=1MB"), FIXTURES / "gpt2/hf",
            ),
        ],
    }  # fmt: skip
    with serve(tmp / "remote") as (base, _counts):
        out["inspect"].append(_json("inspect", f"{base}/gpt2/model.safetensors"))
        url = f"{base}/pair/model.safetensors"
        out["inspect"].append(_json("inspect", "--max-download", "0", url))
        out["verify"].append(_json("verify", f"{base}/gpt2/model.safetensors"))
    return out


# -- the checks ----------------------------------------------------------------------------


def test_every_command_is_in_the_readme() -> None:
    shown = {command for command, _flags in invocations(README)}
    assert set(cli_options()) - {""} <= shown


def test_every_command_the_readme_shows_exists() -> None:
    assert unknown_commands(README) == set()


def test_every_flag_the_readme_shows_exists() -> None:
    assert len(invocations(README)) > 20 and bare_flags(README)  # the README was read
    assert unknown_flags(README) == set()


def test_every_json_field_the_readme_names_is_in_the_output(docs) -> None:  # type: ignore[no-untyped-def]
    fields = json_fields(README)
    assert sorted(fields) == sorted(docs)
    assert {"consumers_agree", "removed_ties", "config_edits", "tie_devices"} <= set().union(
        *fields.values()
    )
    assert missing_fields(README, docs) == set()


# -- and each check fails when the README names what does not exist ------------------------

INSPECT_JSON = "JSON fields: `command`, `path`,"
DEDUPE_HEAD = "### `tiecli dedupe PATH [-o OUT] [--by-value]"


@pytest.mark.parametrize(
    ("old", "new", "check", "expect"),
    [
        ("$ tiecli untie fixtures", "$ tiecli retie fixtures", unknown_commands, {"retie"}),
        (DEDUPE_HEAD, DEDUPE_HEAD + " [--frobnicate]", unknown_flags, {"dedupe --frobnicate"}),
        ("`tiecli verify --require-deduped`", "`tiecli verify --trim-padding`", unknown_flags,
         {"verify --trim-padding"}),  # a flag of another command
        ("`--timeout S`", "`--timeouts S`", unknown_flags, {"--timeouts"}),
        (INSPECT_JSON, INSPECT_JSON + " `frobnicate_count`,", "fields", {"inspect frobnicate_count"}),
        ("`restored_ties`", "`restored_ties`, `untied_bytes`", "fields", {"untie untied_bytes"}),
    ],
)  # fmt: skip
def test_a_made_up_name_in_the_readme_is_caught(
    old: str, new: str, check: Any, expect: set[str], docs: dict[str, list[dict[str, Any]]]
) -> None:
    assert old in README
    text = README.replace(old, new, 1)
    if check == "fields":
        assert missing_fields(text, docs) == expect
    else:
        assert check(text) == expect
