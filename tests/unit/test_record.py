"""The tie record (format v1): what is written is read back the same, earlier
entries are replaced, and every other metadata entry is kept."""

from __future__ import annotations

import json

from tiecli.record import (
    RECORD_KEY,
    RecordedTie,
    read_record,
    record_entry,
    record_metadata,
    recorded_aliases,
)
from tiecli.ties import Tie

SHAPES = {"embed": ((3, 4), "F32"), "norm": ((4,), "F32")}


def test_a_written_record_reads_back_the_same() -> None:
    ties = [
        RecordedTie("head", "embed", "transpose", "tied", ("declared", "storage")),
        RecordedTie("copy", "embed", "identity", "duplicate", ("value",)),
    ]
    meta = record_metadata({"format": "pt", "note": "kept"}, {"embed", "norm"}, ties)
    assert meta["note"] == "kept" and meta["format"] == "pt"
    assert meta["copy"] == "embed" and "head" not in meta  # identity aliases only
    doc = json.loads(meta[RECORD_KEY])
    assert doc["version"] == 1 and [t["alias"] for t in doc["ties"]] == ["head", "copy"]
    back = read_record(meta, SHAPES)
    assert back.present and back.issues == [] and back.convention == []
    assert back.ties == [
        RecordedTie("head", "embed", "transpose", "tied", ("metadata", "declared", "storage")),
        RecordedTie("copy", "embed", "identity", "duplicate", ("metadata", "value")),
    ]


def test_earlier_entries_go_when_their_alias_is_stored_again() -> None:
    first = record_metadata({}, {"embed"}, [RecordedTie("head", "embed")])
    assert first == {"format": "pt", "head": "embed", RECORD_KEY: first[RECORD_KEY]}
    again = record_metadata(first, {"embed", "head"}, [], restored=frozenset({"head"}))
    assert again == {"format": "pt"}
    # an alias still absent keeps nothing of its old entry unless listed again
    dropped = record_metadata(first, {"embed"}, [])
    assert dropped == {"format": "pt"}


def test_aliases_of_an_unreadable_record_are_still_found() -> None:
    assert recorded_aliases('{"ties": [{"alias": "a"}, 3, {"alias": "b"}]}') == {"a", "b"}
    assert recorded_aliases("not json") == set() and recorded_aliases(None) == set()


def test_a_record_entry_keeps_the_reasons_of_the_one_before() -> None:
    t = Tie("head", "embed", "identity", "tied", ["metadata", "value"], stored=False, bytes=4)
    before = {"head": RecordedTie("head", "embed", evidence=("metadata", "declared"))}
    assert record_entry(t, before) == RecordedTie(
        "head", "embed", "identity", "tied", ("declared", "value")
    )
    assert record_entry(t, {}).evidence == ("value",)
    other_source = {"head": RecordedTie("head", "norm", evidence=("declared",))}
    bare = Tie("head", "embed", "identity", "tied", ["metadata"], stored=False, bytes=4)
    assert record_entry(bare, other_source).evidence == ("metadata",)
