"""Tie detection through the library and the `inspect` command."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FIXTURES, FORMS, JSON_HEADER, MANIFEST, TIED_MODELS, fixture_path, with_config
from safetensors.torch import save_file
from typer.testing import CliRunner

import tiecli
from tiecli.cli import app

runner = CliRunner()


def ties_by_alias(result) -> dict[str, object]:
    return {t.alias: t for t in result.ties}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("model", TIED_MODELS)
def test_every_declared_tie_is_found_with_declared_source(model: str, form: str) -> None:
    result = tiecli.inspect(fixture_path(model, form))
    found = ties_by_alias(result)
    declared = MANIFEST["models"][model]["ties"]
    assert declared, "fixture model must declare ties"
    for alias, source in declared.items():
        tie = found[alias]
        assert tie.source == source
        assert tie.kind == "tied"
        assert tie.transform == "identity"
        assert "declared" in tie.evidence
    assert set(found) == set(declared)
    assert not result.problems
    if form.startswith("full"):
        assert result.dedupable_bytes == MANIFEST["models"][model]["alias_bytes"]
        assert all(t.stored and "value" in t.evidence for t in result.ties)
    else:
        assert result.dedupable_bytes == 0
    if form == "bin":
        assert all("storage" in t.evidence and not t.stored for t in result.ties)
    if form.startswith("hf"):
        assert not any(t.stored for t in result.ties)


@pytest.mark.parametrize("form", FORMS)
def test_untied_llama_has_no_ties(form: str) -> None:
    result = tiecli.inspect(fixture_path("llama-untied", form))
    assert result.ties == []
    assert result.problems == []
    assert result.dedupable_bytes == 0


@pytest.mark.parametrize("model", TIED_MODELS)
def test_pattern_table_finds_ties_without_transformers(
    model: str, tmp_path: Path, no_transformers
) -> None:
    bare = tmp_path / "bare.safetensors"  # no config.json beside it
    shutil.copy(fixture_path(model, "full") / "model.safetensors", bare)
    result = tiecli.inspect(bare)
    found = ties_by_alias(result)
    for alias, source in MANIFEST["models"][model]["ties"].items():
        assert found[alias].source == source
        assert found[alias].kind == "tied"
        assert found[alias].evidence == ["pattern", "value"]
    assert result.dedupable_bytes == MANIFEST["models"][model]["alias_bytes"]
    assert "transformers" not in sys.modules or sys.modules["transformers"] is None


def test_pattern_table_with_config_without_transformers(no_transformers) -> None:
    # transformers' own output drops the alias; the config's model_type names it.
    result = tiecli.inspect(fixture_path("llama-tied", "hf"))
    (tie,) = result.ties
    assert (tie.alias, tie.source, tie.stored, tie.evidence) == (
        "lm_head.weight",
        "model.embed_tokens.weight",
        False,
        ["pattern"],
    )
    assert tiecli.inspect(fixture_path("llama-untied", "full")).ties == []


def test_pattern_pair_with_different_values_is_not_a_tie(tmp_path: Path, no_transformers) -> None:
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "untied.safetensors"
    save_file(
        {
            "model.embed_tokens.weight": torch.randn(8, 4, generator=g),
            "lm_head.weight": torch.randn(8, 4, generator=g),
        },
        path,
    )
    result = tiecli.inspect(path)
    assert result.ties == [] and result.problems == []


def test_prefixed_names_match_patterns(tmp_path: Path, no_transformers) -> None:
    w = torch.randn(8, 4)
    path = tmp_path / "lightning.safetensors"
    save_file({"model.transformer.wte.weight": w, "model.lm_head.weight": w.clone()}, path)
    (tie,) = tiecli.inspect(path).ties
    assert (tie.alias, tie.source, tie.kind) == (
        "model.lm_head.weight",
        "model.transformer.wte.weight",
        "tied",
    )


def test_value_duplicate_is_duplicate_and_constants_are_ignored() -> None:
    result = tiecli.inspect(FIXTURES / "custom" / "value-duplicate.safetensors")
    assert [(t.alias, t.source, t.kind, t.evidence) for t in result.ties] == [
        ("b.weight", "a.weight", "duplicate", ["value"])
    ]
    assert result.dedupable_bytes == 0  # duplicates only go with --by-value


def test_transposed_copy_is_found() -> None:
    result = tiecli.inspect(FIXTURES / "custom" / "transposed.safetensors")
    assert [(t.alias, t.source, t.transform, t.kind, t.evidence) for t in result.ties] == [
        ("head.weight", "embed.weight", "transpose", "duplicate", ["transposed"])
    ]


def test_transposed_storage_view_in_pickle() -> None:
    result = tiecli.inspect(FIXTURES / "custom" / "transposed.pt")
    assert [
        (t.alias, t.source, t.transform, t.kind, t.evidence, t.stored) for t in result.ties
    ] == [("head.weight", "embed.weight", "transpose", "tied", ["storage"], False)]


def test_chain_of_transposed_and_identity_copies(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    e = torch.randn(6, 3, generator=g)
    path = tmp_path / "chain.safetensors"
    save_file(
        {
            "a": e,
            "b": e.t().contiguous(),
            "c": e.clone(),
            "d": e.t().contiguous(),
            "other": torch.randn(3, 6, generator=g),
        },
        path,
    )
    got = {(t.alias, t.source, t.transform) for t in tiecli.inspect(path).ties}
    assert got == {("b", "a", "transpose"), ("c", "a", "identity"), ("d", "a", "transpose")}


def test_fresh_model_has_no_value_ties(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "llama",
        num_hidden_layers=2,
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    # many constant norm weights (ones) of the same shape: never ties by value
    assert sum(1 for v in sd.values() if v.dim() == 1 and bool((v == 1).all())) >= 4
    path = tmp_path / "fresh.safetensors"
    save_file(sd, path)
    assert tiecli.inspect(path).ties == []
    model.save_pretrained(tmp_path / "fresh")
    assert tiecli.inspect(tmp_path / "fresh").ties == []


def test_no_ties_reads_a_small_fraction_of_bytes() -> None:
    path = FIXTURES / "custom" / "no-ties.safetensors"
    result = tiecli.inspect(path)
    assert result.ties == []
    assert result.bytes > 300_000
    tensor_reads = result.bytes_read - (path.stat().st_size - result.bytes)  # minus the header
    assert tensor_reads < 0.02 * result.bytes, result.bytes_read


def test_identical_pair_reads_whole_tensors_only_for_candidates(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    big = {f"w{i}": torch.randn(256, 256, generator=g) for i in range(8)}
    big["z_copy"] = big["w3"].clone()  # stored after w3: the later copy is the alias
    path = tmp_path / "one-copy.safetensors"
    save_file(big, path)
    result = tiecli.inspect(path)
    assert [(t.alias, t.source) for t in result.ties] == [("z_copy", "w3")]
    header = path.stat().st_size - result.bytes
    # two tensors are read whole to confirm, the rest only sampled
    assert result.bytes_read - header < 2 * 256 * 256 * 4 + 10_000


def test_drift_reports_max_abs_difference() -> None:
    result = tiecli.inspect(FIXTURES / "drift")
    (tie,) = result.ties
    assert tie.drift is not None and tie.drift.differing == 1
    assert tie.drift.max_abs_diff == pytest.approx(0.5, abs=1e-6)
    (problem,) = result.problems
    assert problem.code == "drift" and problem.severity == "error"
    assert set(problem.tensors) == {"lm_head.weight", "model.embed_tokens.weight"}
    assert "max abs diff 0.5" in problem.message
    assert result.dedupable_bytes == 0


def test_drift_without_transformers_uses_config_pattern(no_transformers) -> None:
    result = tiecli.inspect(FIXTURES / "drift")
    assert [p.code for p in result.problems] == ["drift"]


@pytest.mark.parametrize(
    "name,key",
    [("lightning.ckpt", "state_dict"), ("fairseq.pt", "model"), ("deepspeed.pt", "module")],
)
def test_nested_state_dicts(name: str, key: str) -> None:
    result = tiecli.inspect(FIXTURES / "custom" / "nested" / name)
    assert result.nested_key == key
    assert [(t.alias, t.source) for t in result.ties] == [
        ("lm_head.weight", "transformer.wte.weight")
    ]
    assert "storage" in result.ties[0].evidence


def test_source_missing_is_a_warning(tmp_path: Path) -> None:
    # a converter kept the head and dropped the embedding
    src = fixture_path("llama-tied", "full")
    out = tmp_path / "headonly"
    out.mkdir()
    shutil.copy(src / "config.json", out)
    sd = {
        k: v
        for k, v in __import__("safetensors.torch", fromlist=["x"])
        .load_file(src / "model.safetensors")
        .items()
        if k != "model.embed_tokens.weight"
    }
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    result = tiecli.inspect(out)
    (tie,) = result.ties
    assert (tie.alias, tie.source, tie.stored, tie.source_stored) == (
        "lm_head.weight",
        "model.embed_tokens.weight",
        True,
        False,
    )
    assert [(p.code, p.severity) for p in result.problems] == [("source-missing", "warning")]
    assert result.ok


def test_config_mismatch_when_untied_config_lacks_head(tmp_path: Path) -> None:
    out = with_config("llama-tied", "hf", tmp_path / "m", tie_word_embeddings=False)
    result = tiecli.inspect(out)
    assert [p.code for p in result.problems] == ["config-mismatch"]
    assert not result.ok


def test_convention_metadata_is_read(tmp_path: Path) -> None:
    w = torch.randn(8, 4)
    path = tmp_path / "saved_by_save_model.safetensors"
    save_file({"emb": w, "other": torch.randn(3)}, path, metadata={"format": "pt", "head": "emb"})
    (tie,) = tiecli.inspect(path).ties
    assert (tie.alias, tie.source, tie.kind, tie.evidence, tie.stored) == (
        "head",
        "emb",
        "tied",
        ["metadata"],
        False,
    )


def test_bad_record_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    rec = json.dumps(
        {"version": 1, "ties": [{"alias": "a", "source": "missing"}, {"alias": "b", "source": "a"}]}
    )
    save_file({"x": torch.randn(4)}, path, metadata={"tiecli": rec})
    result = tiecli.inspect(path)
    codes = [p.code for p in result.problems]
    assert codes == ["bad-record", "bad-record"]
    rec2 = json.dumps({"version": 99, "ties": []})
    save_file({"x": torch.randn(4)}, path, metadata={"tiecli": rec2})
    (p,) = tiecli.inspect(path).problems
    assert "version 99" in p.message


# -- CLI ------------------------------------------------------------------


def test_cli_json_document() -> None:
    r = runner.invoke(app, ["inspect", "--json", str(fixture_path("gpt2", "full"))])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    for key in (
        *JSON_HEADER,
        "tensors",
        "bytes",
        "ties",
        "dedupable_bytes",
    ):
        assert key in doc
    assert doc["command"] == "inspect" and doc["format"] == "safetensors" and doc["ok"] is True
    (tie,) = doc["ties"]
    assert set(tie) >= {"alias", "source", "transform", "kind", "evidence", "stored", "bytes"}
    assert doc["dedupable_bytes"] == 4096


def test_cli_exits_zero_even_with_problems() -> None:
    r = runner.invoke(app, ["inspect", "--json", str(FIXTURES / "drift")])
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["problems"][0]["code"] == "drift"
    assert doc["ties"][0]["drift"]["differing_elements"] == 1


def test_cli_table_at_fixed_width() -> None:
    r = runner.invoke(app, ["inspect", str(fixture_path("t5", "full"))], env={"COLUMNS": "160"})
    assert r.exit_code == 0
    out = r.stdout
    for name in (
        "encoder.embed_tokens.weight",
        "decoder.embed_tokens.weight",
        "lm_head.weight",
        "shared.weight",
    ):
        assert name in out
    assert "dedupe would save: 12.0 KiB (12288 bytes)" in out
    assert "declared, value" in out


def test_cli_error_is_one_line_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    r = runner.invoke(app, ["inspect", str(missing)])
    assert r.exit_code == 2
    assert r.stderr.strip() == f"Error: {missing}: no such file or folder"
    assert r.stdout == ""


@pytest.mark.parametrize(
    "argv",
    [
        [
            "-c",
            "import tiecli, sys; print(sorted(m for m in ('torch','transformers','numpy') if m in sys.modules))",
        ],
        ["-m", "tiecli", "--help"],
    ],
)
def test_light_imports(argv: list[str]) -> None:
    code = (
        "import runpy, sys, atexit\n"
        "atexit.register(lambda: sys.__stderr__.write('HEAVY:' + ','.join(m for m in ('torch','transformers') if m in sys.modules)))\n"
    )
    if argv[0] == "-c":
        out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "[]"
    else:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                code + "sys.argv=['tiecli','--help']\n"
                "try:\n  runpy.run_module('tiecli', run_name='__main__')\nexcept SystemExit:\n  pass\n",
            ],
            capture_output=True,
            text=True,
        )
        assert "Usage" in out.stdout
        assert out.stderr.strip().endswith("HEAVY:"), out.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["inspect", "{st}", "--json"],
        ["verify", "{st}", "--json"],
        ["dedupe", "{st}", "--dry-run", "--json"],
        ["untie", "{st}", "--dry-run", "--json"],
        ["fix", "{hf}", "--dry-run", "--json"],
        ["inspect", "{st}"],
    ],
)
def test_json_output_never_imports_rich(command: list[str]) -> None:
    """``--json`` (CI, pre-commit) prints one document without loading rich, about
    20 ms of start-up; the human rendering loads it."""
    paths = {
        "{st}": str(FIXTURES / "custom" / "transposed.safetensors"),
        "{hf}": str(fixture_path("llama-tied", "hf")),
    }
    argv = [paths.get(a, a) for a in command]
    code = (
        "import sys\n"
        "from tiecli.cli import app\n"
        "code = 0\n"
        f"try:\n  app({argv!r})\nexcept SystemExit as e:\n  code = e.code\n"
        "sys.stderr.write(f'EXIT:{code} RICH:' + ','.join(sorted(m for m in sys.modules"
        " if m == 'rich' or m.startswith('rich.'))[:3]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    tail = out.stderr.strip().splitlines()[-1]
    assert tail.startswith("EXIT:0 RICH:") or tail.startswith("EXIT:1 RICH:"), out.stderr
    loaded = tail.split("RICH:", 1)[1]
    if "--json" in command:
        json.loads(out.stdout)
        assert loaded == "", f"{command}: rich loaded ({loaded})"
    else:
        assert loaded.startswith("rich"), out.stderr  # the check can see rich at all


def test_inspect_of_safetensors_without_config_does_not_import_torch() -> None:
    code = (
        "import sys, tiecli\n"
        f"r = tiecli.inspect({str(FIXTURES / 'custom' / 'transposed.safetensors')!r})\n"
        "assert r.ties, r\n"
        "print(','.join(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_declared_ties_are_cached_and_the_cache_skips_transformers(tmp_path: Path) -> None:
    import os

    env = dict(os.environ, TIECLI_CACHE_DIR=str(tmp_path / "cache"))
    code = (
        "import sys, json, tiecli\n"
        f"r = tiecli.inspect({str(fixture_path('llama-tied', 'hf'))!r})\n"
        "print(json.dumps([[t.alias, t.source, t.evidence] for t in r.ties]))\n"
        "print('transformers' in sys.modules)\n"
    )
    first = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    second = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    ties1, imported1 = first.stdout.strip().splitlines()
    ties2, imported2 = second.stdout.strip().splitlines()
    assert imported1 == "True" and imported2 == "False"
    assert ties1 == ties2 and "declared" in ties1
    assert len(list((tmp_path / "cache" / "declared").glob("*.json"))) == 1
    # a changed config is a different entry
    other = with_config("llama-tied", "hf", tmp_path / "llama", tie_word_embeddings=False)
    code2 = code.replace(repr(str(fixture_path("llama-tied", "hf"))), repr(str(other)))
    third = subprocess.run(
        [sys.executable, "-c", code2], capture_output=True, text=True, env=env, check=True
    )
    assert "lm_head.weight" not in third.stdout.splitlines()[0]
    assert len(list((tmp_path / "cache" / "declared").glob("*.json"))) == 2


def test_thousands_of_small_experts_are_sampled_in_few_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same-shaped experts whose first elements collide (bf16 holds few values): the
    last elements rule most out, and elements lying close are read together."""
    import os

    g = torch.Generator().manual_seed(5)
    sd = {}
    for i in range(1500):
        w = torch.randn(8, 16, generator=g).to(torch.bfloat16)
        w[0, 0] = 1.0  # every first element the same
        sd[f"layers.{i}.w1"] = w
        sd[f"layers.{i}.w2"] = torch.randn(16, 8, generator=g).to(torch.bfloat16)
    sd["layers.1499.w_copy"] = sd["layers.7.w1"].clone()
    sd["layers.1499.w_t"] = sd["layers.3.w1"].t().contiguous()
    path = tmp_path / "experts.safetensors"
    save_file(sd, path)
    reads = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, at: reads.append(n) or real(fd, n, at))
    result = tiecli.inspect(path)
    pairs = {(frozenset((t.alias, t.source)), t.transform) for t in result.ties}
    assert pairs == {
        (frozenset(("layers.1499.w_copy", "layers.7.w1")), "identity"),
        (frozenset(("layers.1499.w_t", "layers.3.w1")), "transpose"),
    }
    assert len(reads) < 300, len(reads)  # one by one: 3,000 tensors, a read or more each
    header = path.stat().st_size - result.bytes
    assert result.bytes_read - header < 0.1 * result.bytes  # only the elements asked for


@pytest.mark.parametrize("exists", [True, False])
def test_the_cli_exits_at_once_with_all_output_and_its_code(tmp_path: Path, exists: bool) -> None:
    """With no exit handler to run, the console entry point leaves without the
    interpreter's teardown, its output flushed and its exit code kept."""
    path = FIXTURES / "custom" / "transposed.safetensors" if exists else tmp_path / "nope"
    code = (
        "import os, sys\n"
        "real = os._exit\n"
        "os._exit = lambda c: (sys.__stderr__.write(f'at once {c}'), real(c))\n"
        f"sys.argv = ['tiecli', 'inspect', {str(path)!r}, '--json']\n"
        "from tiecli.cli import main\n"
        "main()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == (0 if exists else 2), out.stderr
    assert out.stderr.endswith(f"at once {out.returncode}"), out.stderr
    if exists:
        assert json.loads(out.stdout)["ties"]
    else:
        assert out.stderr.startswith("Error: ") and out.stdout == ""


@pytest.mark.parametrize(("closed", "exists"), [("stdout", True), ("stderr", False)])
def test_the_cli_keeps_its_exit_code_with_an_output_closed(
    tmp_path: Path, closed: str, exists: bool
) -> None:
    """A closed standard output or error (a cron job's ``>&-``) leaves Python's stream None:
    the exit code stays the command's (0, or 2 for a bad path), with no traceback."""
    path = FIXTURES / "custom" / "transposed.safetensors" if exists else tmp_path / "nope"
    redirect = ">&-" if closed == "stdout" else "2>&-"
    script = f"from tiecli.cli import main; import sys; sys.argv = ['tiecli', 'inspect', {str(path)!r}]; main()"
    out = subprocess.run(
        f"{sys.executable} -c {shlex.quote(script)} {redirect}",
        shell=True,
        capture_output=False,
        stdout=subprocess.DEVNULL if closed == "stderr" else None,
        stderr=subprocess.PIPE if closed == "stdout" else None,
        text=True,
    )
    assert out.returncode == (0 if exists else 2), out.stderr
    assert "Traceback" not in (out.stderr or "")


def test_a_command_imports_its_own_module_not_every_other_one() -> None:
    """``tiecli.api`` imports each command's module when it is first asked for: a
    rewrite does not pay for ``fix``'s decision and the consumers' rules."""
    code = (
        "import sys\n"
        "from tiecli.api import dedupe, inspect\n"
        "print(','.join(m for m in ('tiecli.api.fixing', 'tiecli.agreement', 'tiecli.consumers')"
        " if m in sys.modules))\n"
        "from tiecli.api import fix\n"
        "print('tiecli.api.fixing' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["", "True"], out.stdout
