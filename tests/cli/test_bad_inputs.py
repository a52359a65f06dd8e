"""Bad input gets exit 2 and one ``Error: <path>: ...`` line, and is left untouched (SPEC §4, §8).

Every case of ``tests/corpus.py`` is run through each command with and
without ``--json``; a hypothesis fuzz test then corrupts a valid file at random.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import corpus
import pytest
from helpers import FIXTURES, ROOT, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tiecli.cli import app

# Commands that take the checkpoint as their only positional argument.
COMMANDS = ["inspect", "verify", "dedupe", "untie"]
# Commands that may rewrite a readable input in place (a bad one never).
REWRITING = {"dedupe", "untie"}

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIECLI_DEBUG", raising=False)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory):
    """A fresh corpus per command and output mode, so a rewrite cannot leak into another test."""
    built: dict[str, dict[str, corpus.Case]] = {}

    def get(key: str) -> dict[str, corpus.Case]:
        if key not in built:
            built[key] = {
                c.id: c for c in corpus.build_corpus(tmp_path_factory.mktemp(f"corpus-{key}"))
            }
        return built[key]

    return get


def case_params(mode: str) -> list:
    """(case id, command) pairs; a bug outside the format readers is a strict xfail until fixed."""
    params = []
    for command in COMMANDS:
        for s in corpus.SPECS:
            bug = s.known_bug and any(fnmatch.fnmatch(f"{command}/{mode}", pat) for pat in s.bug_in)
            marks = [pytest.mark.xfail(reason=s.known_bug, strict=True)] if bug else []
            params.append(pytest.param(s.id, command, marks=marks, id=f"{s.id}-{command}"))
    return params


# ----------------------------------------------------------------- helpers
def run(args: list[str]):
    return runner.invoke(app, args)


def crashed(result) -> bool:
    """An exception other than the CLI's own exit escaped, or a traceback was printed."""
    exc = result.exception
    return (exc is not None and not isinstance(exc, SystemExit)) or "Traceback" in result.output


def error_failures(result, culprit: str) -> list[str]:
    """What makes ``result`` not the clean bad-input error SPEC §4 asks for (empty: it is one)."""
    failures = []
    if crashed(result):
        failures.append(f"crashed: {result.exception!r}")
    if result.exit_code != 2:
        failures.append(f"exit code {result.exit_code}, not 2")
    if result.stdout:
        failures.append(f"stdout not empty: {result.stdout[:200]!r}")
    lines = result.stderr.splitlines()
    if len(lines) != 1 or not result.stderr.endswith("\n"):
        failures.append(f"stderr is not exactly one line: {result.stderr[:500]!r}")
    elif not lines[0].startswith("Error: ") or len(lines[0]) <= len("Error: "):
        failures.append(f"stderr does not start with 'Error: ': {lines[0]!r}")
    elif culprit not in lines[0]:
        failures.append(f"the error does not name {culprit!r}: {lines[0]!r}")
    return failures


def success_failures(result, json_out: bool, exit_codes: tuple[int, ...] = (0,)) -> list[str]:
    """What makes ``result`` not a completed run with a report on stdout."""
    failures = []
    if crashed(result):
        failures.append(f"crashed: {result.exception!r}")
    if result.exit_code not in exit_codes:
        failures.append(f"exit code {result.exit_code}, not {exit_codes}: {result.stderr[:300]!r}")
    if json_out:
        try:
            doc = json.loads(result.stdout)
        except ValueError:
            failures.append(f"stdout is not one JSON document: {result.stdout[:200]!r}")
        else:
            if not isinstance(doc, dict) or "ok" not in doc:
                failures.append(f"JSON document lacks 'ok': {result.stdout[:200]!r}")
    elif not result.stdout.strip():
        failures.append("no report on stdout")
    return failures


def check_case(case: corpus.Case, command: str, json_out: bool) -> None:
    args = [command, str(case.path)] + (["--json"] if json_out else [])
    before = snapshot(case.folder)
    result = run(args)
    after = snapshot(case.folder)
    where = f"{case.id} ({case.description}), tiecli {' '.join(args[:1] + args[2:])}"
    assert not case.marker.exists(), f"{where}: a pickle payload ran and created {case.marker}"
    assert sorted(after) == sorted(before), (
        f"{where}: files appeared or vanished: {sorted(set(after) ^ set(before))}"
    )
    # readable inputs: verify may fail its checks (1), dedupe/untie may rewrite them in place,
    # except those a rewrite must refuse (an unreadable tie record)
    expected = (2,) if case.refused_rewrite and command in REWRITING else case.exit_codes
    done = tuple(sorted({0, 1} if command == "verify" else {0})) if 0 in expected else ()
    if result.exit_code in done:
        failures = success_failures(result, json_out, done)
    else:
        failures = error_failures(result, case.culprit)
    if command not in REWRITING or result.exit_code != 0:
        changed = sorted(k for k in before if before[k] != after.get(k))
        failures += [f"files changed: {changed}"] if changed else []
    if result.exit_code == 2 and 2 not in expected:
        failures.append("a readable input was refused")
    if result.exit_code != 2 and expected == (2,):
        failures.append(f"exit {result.exit_code}: the rewrite had to be refused")
    assert not failures, f"{where}: {failures}"


# ----------------------------------------------------------------- the corpus
def test_corpus_cases_live_in_their_own_folders(corpora) -> None:
    cases = corpora("layout")
    assert len(cases) == len(corpus.SPECS) > 100
    for c in cases.values():
        assert c.folder.name == c.id
        assert c.path == c.folder or c.folder in c.path.parents


@pytest.mark.parametrize(("case_id", "command"), case_params("human"))
def test_bad_input(corpora, case_id: str, command: str) -> None:
    check_case(corpora(f"{command}-human")[case_id], command, json_out=False)


@pytest.mark.parametrize(("case_id", "command"), case_params("json"))
def test_bad_input_json(corpora, case_id: str, command: str) -> None:
    check_case(corpora(f"{command}-json")[case_id], command, json_out=True)


@pytest.mark.parametrize(
    ("case_id", "command"),
    [
        pytest.param(s.id, command, id=f"{s.id}-{command}")
        for command in COMMANDS
        if command in REWRITING
        for s in corpus.SPECS
        if s.exit_codes == (2,)
    ],
)
def test_bad_input_no_partial_output(corpora, case_id: str, command: str) -> None:
    """With -o, a bad input leaves no output behind (the output would land in the case folder)."""
    case = corpora(f"{command}-output")[case_id]
    out = case.folder / f"out{case.path.suffix}"
    before = snapshot(case.folder)
    result = run([command, str(case.path), "-o", str(out)])
    assert error_failures(result, case.culprit) == []
    assert not out.exists() and snapshot(case.folder) == before
    assert not case.marker.exists()


@pytest.mark.parametrize(
    "case_id", ["header-not-json", "index-missing-shard", "pt-payload-system", "pt-quantized"]
)
def test_console_entry_point(corpora, case_id: str) -> None:
    """The installed entry point, not just the app: no warning or traceback on stderr."""
    case = corpora("entry-point")[case_id]
    before = snapshot(case.folder)
    proc = subprocess.run(
        [sys.executable, "-c", "from tiecli.cli import main; main()", "inspect", str(case.path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(case.folder.parent), "PYTHONWARNINGS": "default"},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and case.culprit in lines[0], (
        proc.stderr
    )
    assert snapshot(case.folder) == before
    assert not case.marker.exists()


# ----------------------------------------------------------------- control: success is no error
@pytest.fixture(scope="module")
def valid_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("control") / "gpt2"
    shutil.copytree(FIXTURES / "gpt2" / "full", dst)
    return dst


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("json_out", [False, True], ids=["human", "json"])
def test_control_valid_checkpoint_passes(valid_copy: Path, command: str, json_out: bool) -> None:
    args = [command, str(valid_copy)] + (["--json"] if json_out else [])
    before = snapshot(valid_copy)
    result = run(args)
    assert success_failures(result, json_out) == []
    # the harness tells success from failure: the bad-input checks reject this run
    assert error_failures(result, valid_copy.name) != []
    if command == "inspect":
        assert snapshot(valid_copy) == before


def test_harness_rejects_a_traceback() -> None:
    result = runner.invoke(
        app, ["inspect", str(ROOT / "fixtures" / "gpt2" / "full")], catch_exceptions=True
    )
    assert not crashed(result)

    class Fake:
        exception = RuntimeError("boom")
        exit_code = 1
        stdout = ""
        stderr = "Traceback (most recent call last):\n  ...\nRuntimeError: boom\n"
        output = stderr

    assert crashed(Fake())
    assert error_failures(Fake(), "x") != []


# ----------------------------------------------------------------- fuzz
def _base_file() -> bytes:
    import torch
    from safetensors.torch import save

    embed = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return save(
        {
            "embed.weight": embed,
            "lm_head.weight": embed.clone(),
            "norm.bias": torch.arange(4, dtype=torch.float16),
        },
        metadata={"format": "pt"},
    )


BASE = _base_file()
HEADER_END = 8 + struct.unpack("<Q", BASE[:8])[0]

flips = st.lists(
    st.tuples(st.integers(0, HEADER_END - 1), st.integers(0, 255)), min_size=1, max_size=8
).map(lambda changes: ("flip", changes))
cuts = st.integers(0, len(BASE) - 1).map(lambda n: ("cut", n))
lengths = st.one_of(
    st.integers(0, 2**64 - 1),
    st.integers(-16, 16).map(lambda d: max(0, HEADER_END - 8 + d)),
).map(lambda n: ("length", n))


def mutate(kind: str, arg) -> bytes:
    if kind == "flip":
        data = bytearray(BASE)
        for pos, value in arg:
            data[pos] = value
        return bytes(data)
    if kind == "cut":
        return BASE[:arg]
    return struct.pack("<Q", arg) + BASE[8:]


def check_mutant(
    data: bytes, args: list[str] | None = None, name: str = "model.safetensors"
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        result = run(["inspect", str(path), *(args or [])])
        assert not crashed(result), repr(result.exception)
        assert result.exit_code in (0, 2), (result.exit_code, result.stderr)
        if result.exit_code == 2:
            assert error_failures(result, path.name) == []
        else:
            assert success_failures(result, bool(args)) == []
        assert path.read_bytes() == data
        assert [p.name for p in Path(tmp).iterdir()] == [name]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(flips, cuts, lengths))
def test_fuzz_corrupted_safetensors(mutation: tuple) -> None:
    check_mutant(mutate(*mutation))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    entry=st.sampled_from(["embed.weight", "lm_head.weight", "norm.bias", "__metadata__"]),
    key=st.sampled_from(["dtype", "shape", "data_offsets", "format", "extra", "tiecli"]),
    value=json_values,
)
def test_fuzz_header_fields(entry: str, key: str, value) -> None:
    """Any JSON value in any field of a valid header: a report or a clean error."""
    header = json.loads(BASE[8:HEADER_END])
    header[entry][key] = value
    raw = json.dumps(header).encode()
    check_mutant(struct.pack("<Q", len(raw)) + raw + BASE[HEADER_END:], ["--json"])


def _base_pickle() -> bytes:
    import io

    import torch

    embed = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    buf = io.BytesIO()
    torch.save({"embed.weight": embed, "lm_head.weight": embed, "norm.weight": torch.ones(4)}, buf)
    return buf.getvalue()


BASE_PT = _base_pickle()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.lists(
            st.tuples(st.integers(0, len(BASE_PT) - 1), st.integers(0, 255)), min_size=1, max_size=4
        ).map(lambda changes: ("flip", changes)),
        st.integers(0, len(BASE_PT) - 1).map(lambda n: ("cut", n)),
    )
)
def test_fuzz_corrupted_pickle(mutation: tuple) -> None:
    """Damaged zip structure or pickle opcodes: a report or a clean error, never a traceback."""
    kind, arg = mutation
    data = bytearray(BASE_PT)
    if kind == "flip":
        for pos, value in arg:
            data[pos] = value
    else:
        data = data[:arg]
    check_mutant(bytes(data), name="model.pt")
