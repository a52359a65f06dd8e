"""Finding ties (tiecli.detect.find_ties) in checkpoints built in memory: each kind of
evidence, drift, and what is never a tie."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from in_memory import checkpoint, entry, seeded

from tiecli.detect import find_ties
from tiecli.ties import TieReport

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
LLAMA = {"model_type": "llama", "tie_word_embeddings": True}


def ties(report: TieReport) -> dict[str, tuple[str, str, str, list[str], bool]]:
    return {t.alias: (t.source, t.transform, t.kind, t.evidence, t.stored) for t in report.ties}


def codes(report: TieReport) -> list[str]:
    return [p.code for p in report.problems]


def find(*entries, **kw) -> TieReport:  # type: ignore[no-untyped-def]
    return find_ties(checkpoint(*entries, **kw), use_transformers=False)


def test_a_stored_copy_of_the_embedding_is_a_tie_by_pattern_and_value() -> None:
    x = seeded(0, 10, 4)
    r = find(entry(EMB, x), entry(HEAD, x.copy()), config=LLAMA)
    assert ties(r) == {HEAD: (EMB, "identity", "tied", ["pattern", "value"], True)}
    assert r.problems == [] and r.declared_by == "pattern table"
    assert r.dedupable_bytes == x.nbytes


def test_copies_that_differ_are_a_drifted_tie() -> None:
    x = seeded(1, 10, 4)
    y = x.copy()
    y[3, 2] += 1.0
    r = find(entry(EMB, x), entry(HEAD, y), config=LLAMA)
    (t,) = r.ties
    assert (t.alias, t.source, t.evidence) == (HEAD, EMB, ["pattern"])
    assert t.drift is not None and (t.drift.differing, t.drift.numel) == (1, 40)
    assert t.drift.max_abs_diff == 1.0
    assert codes(r) == ["drift"] and r.dedupable_bytes == 0


def test_an_absent_head_under_an_untied_config_is_a_config_mismatch() -> None:
    r = find(entry(EMB, seeded(2, 10, 4)), config={**LLAMA, "tie_word_embeddings": False})
    assert r.ties == []
    assert codes(r) == ["config-mismatch"]
    assert r.problems[0].tensors == [HEAD, EMB]


def test_the_record_names_an_absent_alias() -> None:
    x = seeded(3, 10, 4)
    record = {"version": 1, "ties": [{"alias": HEAD, "source": EMB}]}
    r = find(entry(EMB, x), metadata={"tiecli": json.dumps(record)})
    assert ties(r) == {HEAD: (EMB, "identity", "tied", ["metadata"], False)}
    assert r.ties[0].bytes == x.nbytes and r.problems == []


def test_a_record_that_cannot_be_true_is_a_problem_not_a_tie() -> None:
    x = seeded(4, 10, 4)
    record = {"version": 1, "ties": [{"alias": HEAD, "source": EMB}]}  # but HEAD is stored
    r = find(
        entry(EMB, x),
        entry(HEAD, seeded(5, 10, 4)),
        metadata={"tiecli": json.dumps(record)},
    )
    assert "bad-record" in codes(r)
    assert all(t.evidence != ["metadata"] for t in r.ties)


def test_equal_tensors_under_unknown_names_are_duplicates_by_value() -> None:
    x = seeded(6, 5, 3)
    r = find(entry("a", x), entry("b", x.copy()), entry("c", seeded(7, 5, 3)))
    assert ties(r) == {"b": ("a", "identity", "duplicate", ["value"], True)}


def test_a_transposed_copy_is_found_with_its_transform() -> None:
    x = seeded(8, 10, 4)
    r = find(entry("a", x), entry("b", np.ascontiguousarray(x.T)))
    assert ties(r) == {"b": ("a", "transpose", "duplicate", ["transposed"], True)}


def test_constant_tensors_are_never_tied_by_value() -> None:
    zeros = np.zeros((4, 4), np.float32)
    assert find(entry("a", zeros), entry("b", zeros.copy())).ties == []


def test_names_sharing_one_pickle_storage_are_tied_by_storage() -> None:
    x = seeded(9, 10, 4)
    storage = (7, x.nbytes)
    view = (0, (4, 1))
    file = Path("pytorch_model.bin")
    emb = entry(EMB, x, storage=storage, view=view, file=file)
    head = entry(HEAD, x, storage=storage, view=view, file=file)
    r = find(emb, head, format="pytorch")
    (t,) = r.ties
    assert (t.alias, t.source, t.transform) == (HEAD, EMB, "identity")
    assert "storage" in t.evidence
    assert not t.dedupable  # already one storage: nothing to remove


def test_a_transposed_view_of_one_storage_is_a_transpose_tie() -> None:
    x = seeded(10, 10, 4)
    storage, file = (3, x.nbytes), Path("m.bin")
    a = entry("a", x, storage=storage, view=(0, (4, 1)), file=file)
    b = entry("b", np.ascontiguousarray(x.T), storage=storage, view=(0, (1, 4)), file=file)
    (t,) = find(a, b, format="pytorch").ties
    assert (t.alias, t.source, t.transform) == ("b", "a", "transpose")
    assert "storage" in t.evidence
