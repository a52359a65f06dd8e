"""Finding ties on hand-built entries held in memory: names, shapes, values,
shared pickle storage and the record, with no file and no format behind them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tiecli.checkpoint import Checkpoint, Entry
from tiecli.detect import find_ties
from tiecli.grouping import fills
from tiecli.record import RECORD_KEY
from tiecli.ties import Tie, TieReport


class Memory:
    """A blob over bytes in memory."""

    def __init__(self, data: bytes, at: int = 0):
        self.data, self.nbytes, self.at = data, len(data), at

    def read(self, offset: int, size: int) -> bytes:
        return self.data[offset : offset + size]

    def readinto(self, offset: int, view: memoryview) -> None:
        view[:] = self.data[offset : offset + len(view)]

    def array(self, dtype: str, shape: tuple[int, ...]) -> Any:
        return np.frombuffer(self.data, dtype="<u4").reshape(shape)

    @property
    def order(self) -> tuple[int, int]:
        return (0, self.at)


def entry(name: str, values: Any, **kw: Any) -> Entry:
    a = np.ascontiguousarray(values, dtype="<f4")
    data = a.tobytes()
    return Entry(name, "F32", tuple(a.shape), len(data), Memory(data), **kw)


def checkpoint(*entries: Entry, metadata: dict[str, Any] | None = None) -> Checkpoint:
    return Checkpoint(
        path=Path("memory.safetensors"),
        format="safetensors",
        entries={e.name: e for e in entries},
        weight_files=[Path("memory.safetensors")],
        metadata=metadata or {},
    )


def find(*entries: Entry, metadata: dict[str, Any] | None = None) -> TieReport:
    return find_ties(checkpoint(*entries, metadata=metadata), use_transformers=False)


W = np.arange(12, dtype=np.float32).reshape(3, 4)


def test_equal_values_nobody_declared_are_a_duplicate() -> None:
    r = find(entry("embed", W), entry("other", W + 100), entry("copy", W))
    assert [(t.alias, t.source, t.kind, t.evidence) for t in r.ties] == [
        ("copy", "embed", "duplicate", ["value"])
    ]
    (t,) = r.ties
    assert t.stored and t.bytes == W.nbytes and not t.dedupable  # by value only
    assert r.problems == []


def test_a_transposed_copy_is_found_by_its_shape() -> None:
    r = find(entry("embed", W), entry("head", W.T))
    assert [(t.alias, t.source, t.transform, t.evidence) for t in r.ties] == [
        ("head", "embed", "transpose", ["transposed"])
    ]


def test_constant_and_one_element_tensors_never_match() -> None:
    r = find(
        entry("zeros", np.zeros((3, 4))),
        entry("zeros2", np.zeros((3, 4))),
        entry("one", [1.0]),
        entry("one2", [1.0]),
    )
    assert r.ties == []


def test_a_recorded_alias_absent_from_the_file_is_tied_to_its_source() -> None:
    record = {
        "version": 1,
        "ties": [{"alias": "head", "source": "embed", "transform": "transpose"}],
    }
    r = find(entry("embed", W), metadata={RECORD_KEY: json.dumps(record)})
    (t,) = r.ties
    assert (t.alias, t.source, t.transform, t.kind) == ("head", "embed", "transpose", "tied")
    assert t.evidence == ["metadata"] and not t.stored and t.source_stored
    (f,) = fills(r.ties, {"embed"})
    assert (f.name, f.origin, f.transform) == ("head", "embed", "transpose")


def test_a_bad_record_is_a_problem_not_a_tie() -> None:
    record = {"version": 1, "ties": [{"alias": "head", "source": "missing"}]}
    r = find(entry("embed", W), metadata={RECORD_KEY: json.dumps(record)})
    assert r.ties == []
    assert [(p.code, p.severity, p.tensors) for p in r.problems] == [
        ("bad-record", "error", ["head", "missing"])
    ]


def test_a_declared_pair_whose_copies_differ_drifts() -> None:
    other = W.copy()
    other[1, 2] += 0.5
    r = find(entry("embed", W), entry("head", other), metadata={"head": "embed"})
    (t,) = r.ties
    assert t.kind == "tied" and t.evidence == ["metadata"] and not t.dedupable
    assert t.drift is not None and (t.drift.differing, t.drift.max_abs_diff) == (1, 0.5)
    assert [p.code for p in r.problems] == ["drift"]


def test_a_declared_pair_with_equal_copies_is_dedupable() -> None:
    r = find(entry("embed", W), entry("head", W), metadata={"head": "embed"})
    (t,) = r.ties
    assert t.evidence == ["metadata", "value"] and t.dedupable and r.dedupable_bytes == W.nbytes


def test_a_padded_copy_is_a_pad_not_a_drift_alone() -> None:
    longer = np.concatenate([W, np.ones((2, 4), np.float32)])
    r = find(entry("embed", longer), entry("head", W), metadata={"head": "embed"})
    (t,) = r.ties
    assert t.pad is not None and (t.pad.source_rows, t.pad.alias_rows) == (5, 3)
    assert [p.code for p in r.problems] == ["padded"]


def test_pickle_views_of_one_storage_are_a_storage_tie_stored_once() -> None:
    storage = (7, W.nbytes)
    r = find(
        entry("embed", W, storage=storage, view=(0, (4, 1))),
        entry("head", W, storage=storage, view=(0, (4, 1))),
    )
    (t,) = r.ties
    assert (t.alias, t.source, t.evidence) == ("head", "embed", ["storage"])
    assert not t.stored and not t.duplicated


def test_fills_give_every_absent_member_from_whichever_is_stored() -> None:
    ties = [
        Tie("enc", "shared", "identity", "tied", ["declared"], stored=True, bytes=4),
        Tie("dec", "shared", "identity", "tied", ["declared"], stored=False, bytes=4),
        Tie("head", "shared", "transpose", "tied", ["declared"], stored=False, bytes=4),
    ]
    made = {f.name: (f.origin, f.transform) for f in fills(ties, {"enc"})}
    assert made == {
        "shared": ("enc", "identity"),
        "dec": ("enc", "identity"),
        "head": ("enc", "transpose"),
    }


def test_find_equal_groups_equal_tensors_and_pairs_transposes() -> None:
    from tiecli.matching import find_equal

    other = W + 1
    entries = [
        entry("a", W),
        entry("b", other),
        entry("c", W),
        entry("d", W),
        entry("t", W.T),
        entry("z", np.zeros((3, 4))),
        entry("z2", np.zeros((3, 4))),
    ]
    m = find_equal(entries)
    assert [[e.name for e in g] for g in m.groups] == [["a", "c", "d"]]
    # each copy pairs with the transpose; grouping then joins them into one group
    assert [(x.name, y.name) for x, y in m.transposed] == [("a", "t"), ("c", "t"), ("d", "t")]
    assert m.unconfirmed == set()
    # names already known equal are read as one: a class of one finds no group
    known = find_equal(entries, known={"a": "a", "c": "a", "d": "a"})
    assert known.groups == []


def test_candidates_are_narrowed_by_shape_and_first_element() -> None:
    from tiecli.matching import could_match, shaped_like_another

    entries = [entry("a", W), entry("b", W + 1), entry("c", W), entry("t", W.T), entry("v", [1, 2])]
    assert [e.name for e in shaped_like_another(entries)] == ["a", "b", "c", "t"]
    assert [e.name for e in could_match(entries)] == ["a", "c", "t"]
