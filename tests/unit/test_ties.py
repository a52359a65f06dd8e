"""The tie vocabulary: one table of problem codes that every raised problem and the
README agree with, and the JSON shape of a tie."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tiecli.ties import PROBLEMS, Drift, Pad, Problem, Tie, problem

ROOT = Path(__file__).resolve().parents[2]


def _raised() -> dict[tuple[str, str], str]:
    """(code, severity) of every ``Problem(...)`` / ``problem(...)`` call in tiecli with
    a literal code, and where it is ("-" for the severity ``problem`` takes from the table)."""
    found: dict[tuple[str, str], str] = {}
    for path in sorted((ROOT / "tiecli").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                continue
            if node.func.id not in ("Problem", "problem") or not node.args:
                continue
            code = node.args[0]
            if not isinstance(code, ast.Constant):
                continue  # a copy of another problem's code
            severity = "-"
            if node.func.id == "Problem":
                assert isinstance(node.args[1], ast.Constant), (path, node.lineno)
                severity = node.args[1].value
            found[(code.value, severity)] = f"{path.relative_to(ROOT)}:{node.lineno}"
    return found


def test_every_raised_problem_code_is_in_the_table_with_its_severity() -> None:
    raised = _raised()
    assert len({code for code, _ in raised}) >= 10  # the scan sees the code that raises them
    for (code, severity), where in raised.items():
        assert code in PROBLEMS, f"{where}: code {code!r} is not in tiecli.ties.PROBLEMS"
        if severity != "-":
            assert severity == PROBLEMS[code].severity, f"{where}: {code} is {severity}"


def test_every_code_in_the_table_is_raised_somewhere() -> None:
    assert {code for code, _ in _raised()} == set(PROBLEMS)


def test_the_readme_lists_the_same_codes_and_severities() -> None:
    text = (ROOT / "README.md").read_text()
    table = text[text.index("**Problems**") :]
    table = table[: table.index("\n\n", table.index("| code |"))]
    rows = re.findall(r"^\| `([a-z-]+)` \| (error|warning) \|", table, re.M)
    assert dict(rows) == {code: p.severity for code, p in PROBLEMS.items()}
    assert len(rows) == len(PROBLEMS)


def test_problem_takes_its_severity_from_the_table() -> None:
    assert problem("unconfirmed", "m", ["a"]) == Problem("unconfirmed", "warning", "m", ["a"])
    assert problem("drift", "m").to_dict() == {
        "code": "drift",
        "severity": "error",
        "message": "m",
        "tensors": [],
    }
    with pytest.raises(KeyError):
        problem("no-such-code", "m")


def test_a_tie_in_json_names_drift_pad_and_unconfirmed_only_when_set() -> None:
    plain = Tie("b", "a", "identity", "tied", ["declared", "value"], stored=True, bytes=8)
    assert plain.to_dict() == {
        "alias": "b",
        "source": "a",
        "transform": "identity",
        "kind": "tied",
        "evidence": ["declared", "value"],
        "stored": True,
        "bytes": 8,
        "source_stored": True,
    }
    assert plain.duplicated and plain.dedupable
    drifted = Tie(
        "b",
        "a",
        "identity",
        "tied",
        ["pattern"],
        stored=True,
        bytes=8,
        drift=Drift(0.5, 1, 2, sampled=True),
        pad=Pad(4, 2),
        unconfirmed=True,
    )
    d = drifted.to_dict()
    assert d["drift"] == {
        "max_abs_diff": 0.5,
        "differing_elements": 1,
        "elements": 2,
        "sampled": True,
    }
    assert d["pad"] == {"source_rows": 4, "alias_rows": 2} and d["unconfirmed"] is True
    assert not drifted.duplicated
    across = Tie("b", "a", "identity", "tied", [], stored=True, bytes=8, across_files=True)
    assert across.duplicated and not across.dedupable
