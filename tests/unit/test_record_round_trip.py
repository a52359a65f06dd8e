"""The tie record: what record_metadata writes, read_record reads back the same; what
no writer would write is an issue, never a tie."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tiecli.record import RECORD_KEY, RecordedTie, max_record_ties, read_record, record_metadata

SHAPES = {
    "emb": ((10, 4), "F32"),
    "head_t": ((4, 10), "F32"),
    "norm": ((4,), "F32"),
    "packed": ((10, 4), "F4"),
}
TIES = [
    RecordedTie("head", "emb", "identity", "tied", ("metadata", "declared", "value")),
    RecordedTie("proj", "emb", "transpose", "tied", ("metadata", "transposed")),
    RecordedTie("copy", "norm", "identity", "duplicate", ("metadata", "value")),
]


def test_what_is_written_reads_back_the_same() -> None:
    meta = record_metadata({"format": "pt", "note": "kept"}, set(SHAPES), TIES)
    assert meta["note"] == "kept" and meta["format"] == "pt"
    # an identity tie is also written in the {alias: source} convention other tools read
    assert meta["head"] == "emb" and meta["copy"] == "norm" and "proj" not in meta
    doc = json.loads(meta[RECORD_KEY])
    assert doc["version"] == 1 and [t["alias"] for t in doc["ties"]] == ["head", "proj", "copy"]
    rec = read_record(meta, SHAPES)
    assert rec.present and rec.issues == []
    assert rec.ties == TIES
    assert rec.convention == []  # the convention entries repeat tiecli's own


def test_rewriting_the_record_replaces_it() -> None:
    first = record_metadata({}, set(SHAPES), TIES)
    second = record_metadata(first, set(SHAPES), TIES[:1])
    assert read_record(second, SHAPES).ties == TIES[:1]
    assert "copy" not in second  # its convention entry went with it
    cleared = record_metadata(second, set(SHAPES) | {"head"}, [], restored=frozenset({"head"}))
    assert RECORD_KEY not in cleared and "head" not in cleared
    assert read_record(cleared, {**SHAPES, "head": ((10, 4), "F32")}).ties == []


def test_the_convention_alone_is_read_as_ties() -> None:
    rec = read_record({"format": "pt", "lm_head.weight": "emb", "total_size": "9"}, SHAPES)
    assert not rec.present and rec.ties == [] and rec.issues == []
    assert rec.convention == [RecordedTie("lm_head.weight", "emb")]


def own(*ties: Any, version: Any = 1) -> dict[str, str]:
    return {RECORD_KEY: json.dumps({"version": version, "ties": list(ties)})}


@pytest.mark.parametrize(
    ("metadata", "says"),
    [
        ({RECORD_KEY: "{not json"}, "not valid JSON"),
        ({RECORD_KEY: "[]"}, "not a JSON object"),
        (own(version=2), "version 2 is not supported"),
        ({RECORD_KEY: json.dumps({"version": 1})}, "no 'ties' list"),
        (own({"alias": "a"}), "lacks string 'alias' and 'source'"),
        (own({"alias": "a", "source": "emb", "transform": "flip"}), "unknown transform"),
        (own({"alias": "a", "source": "emb", "kind": "maybe"}), "unknown kind"),
        (own({"alias": "emb", "source": "emb"}), "its own source"),
        (own({"alias": "norm", "source": "emb"}), "also stored"),
        (own({"alias": "a", "source": "gone"}), "which is not stored"),
        (own({"alias": "a", "source": "b"}, {"alias": "b", "source": "emb"}), "itself an alias"),
        (own({"alias": "a", "source": "norm", "transform": "transpose"}), "needs a 2-D source"),
        (own({"alias": "a", "source": "packed", "transform": "transpose"}), "whole-byte"),
        (own({"alias": "a", "source": "emb"}, {"alias": "a", "source": "emb"}), "twice"),
    ],
)
def test_a_record_no_writer_would_write_is_an_issue(metadata: dict[str, str], says: str) -> None:
    rec = read_record(metadata, SHAPES)
    assert rec.present
    assert any(says in issue.message for issue in rec.issues), rec.issues
    assert all(t.alias != "emb" and t.alias != "norm" for t in rec.ties)


def test_a_record_longer_than_the_file_can_hold_is_refused() -> None:
    cap = max_record_ties(len(SHAPES))
    ties = [{"alias": f"a{i}", "source": "emb"} for i in range(cap + 1)]
    rec = read_record(own(*ties), SHAPES)
    assert rec.ties == [] and "more than can be true" in rec.issues[0].message
    convention = {f"a{i}": "emb" for i in range(cap + 1)}
    rec = read_record(convention, SHAPES)
    assert rec.convention == [] and "more than can be true" in rec.issues[0].message
