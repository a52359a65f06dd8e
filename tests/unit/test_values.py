"""Comparing tensors by value (tiecli.values) on entries held in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from in_memory import entry, seeded

from tiecli.checkpoint import Entry
from tiecli.io.blobs import FileBlob
from tiecli.io.files import ByteFile
from tiecli.matching import find_equal
from tiecli.values import (
    SAMPLES,
    difference,
    digest,
    equal,
    first_different,
    same_samples,
    sample,
    sample_positions,
    sampled_difference,
)


def test_sample_positions_spread_from_first_to_last() -> None:
    assert sample_positions(100) == [0, 14, 28, 42, 56, 70, 84, 99]
    assert sample_positions(5) == [0, 1, 2, 3, 4]  # fewer elements than samples: all of them
    assert sample_positions(0) == []
    assert sample_positions(1000, 3) == [0, 499, 999]


def test_sample_reads_only_the_sampled_elements() -> None:
    e = entry("w", seeded(0, 10, 10))
    got = sample(e)
    assert e.blob.reads == [(p * 4, 4) for p in sample_positions(100)]
    flat = seeded(0, 10, 10).reshape(-1)
    assert got == b"".join(flat[p].tobytes() for p in sample_positions(100))


def changed(arr: np.ndarray, flat_index: int, by: float = 0.5) -> np.ndarray:
    out = arr.copy().reshape(-1)
    out[flat_index] += by
    return out.reshape(arr.shape)


def test_equal_is_bitwise() -> None:
    x = seeded(1, 8, 6)
    assert equal(entry("a", x), entry("b", x.copy()))
    assert not equal(entry("a", x), entry("b", changed(x, 13)))
    # same bytes, other dtype or shape: not equal
    assert not equal(entry("a", x), entry("b", x.view(np.int32)))
    assert not equal(entry("a", x), entry("b", x.reshape(6, 8)))


def test_equal_reads_whole_tensors_only_when_the_samples_agree() -> None:
    x = seeded(2, 64, 64)
    a, b = entry("a", x), entry("b", changed(x, 0))  # element 0 is sampled
    assert not equal(a, b)
    assert a.blob.bytes_read <= SAMPLES * 4 and b.blob.bytes_read <= SAMPLES * 4


def test_same_samples_sees_only_the_samples() -> None:
    x = seeded(3, 10, 10)
    unsampled = next(i for i in range(100) if i not in sample_positions(100))
    a, b = entry("a", x), entry("b", changed(x, unsampled))
    assert same_samples(a, b)  # the difference lies between the samples...
    assert a.blob.bytes_read == b.blob.bytes_read == SAMPLES * 4  # ...and nothing else is read
    assert not equal(a, b)  # a whole comparison finds it
    assert not same_samples(a, entry("c", changed(x, 99)))  # the last element is sampled


@pytest.mark.parametrize("shape", [(3, 5), (1, 7), (16, 2)])
def test_a_transposed_copy_is_equal_under_transpose(shape: tuple[int, int]) -> None:
    x = seeded(4, *shape)
    a, bt = entry("a", x), entry("b", np.ascontiguousarray(x.T))
    assert not equal(a, bt)  # the shapes differ
    assert same_samples(a, bt, "transpose") and equal(a, bt, "transpose")
    assert not equal(a, entry("c", np.ascontiguousarray(changed(x, 1).T)), "transpose")


def test_transpose_needs_two_dimensions() -> None:
    x = seeded(5, 2, 3, 4)
    assert not same_samples(entry("a", x), entry("b", x.copy()), "transpose")


def test_digest_is_the_same_for_equal_tensors_only() -> None:
    x = seeded(6, 4, 4)
    d1, d2 = digest(entry("a", x)), digest(entry("b", x.copy()))
    assert d1.digest == d2.digest and not d1.constant
    assert digest(entry("c", changed(x, 15))).digest != d1.digest
    # the bytes alone do not make a tensor: dtype and shape are part of it
    assert digest(entry("d", x.view(np.int32))).digest != d1.digest
    assert digest(entry("e", x.reshape(2, 8))).digest != d1.digest


def test_digest_tells_a_constant_tensor() -> None:
    assert digest(entry("zeros", np.zeros((5, 5), np.float32))).constant
    assert digest(entry("ones", np.ones(7, np.float16))).constant
    assert not digest(entry("ramp", np.arange(7, dtype=np.float16))).constant


def test_difference_counts_elements_and_the_largest_change() -> None:
    x = seeded(7, 6, 6)
    y = changed(changed(changed(x, 0, 0.25), 17, -2.0), 35, 0.5)
    d = difference(entry("a", x), entry("b", y))
    assert (d.differing, d.numel) == (3, 36)
    assert d.max_abs_diff == pytest.approx(2.0)
    same = difference(entry("a", x), entry("b", x.copy()))
    assert (same.differing, same.max_abs_diff) == (0, 0.0)


def test_difference_under_transpose() -> None:
    x = seeded(8, 3, 4)
    y = changed(x, 5, 1.5)
    d = difference(entry("a", x), entry("b", np.ascontiguousarray(y.T)), "transpose")
    assert (d.differing, d.numel) == (1, 12)
    assert d.max_abs_diff == pytest.approx(1.5)


def test_sampled_difference_compares_the_samples_alone() -> None:
    x = seeded(9, 10, 10)
    unsampled = next(i for i in range(100) if i not in sample_positions(100))
    d = sampled_difference(entry("a", x), entry("b", changed(x, unsampled)))
    assert (d.differing, d.numel) == (0, SAMPLES)
    d = sampled_difference(entry("a", x), entry("b", changed(x, 14, 3.0)))
    assert d.differing == 1 and d.max_abs_diff == pytest.approx(3.0)


def test_find_equal_groups_copies_and_pairs_transposes() -> None:
    x, other = seeded(10, 6, 4), seeded(11, 6, 4)
    entries = [
        entry("emb", x),
        entry("unrelated", other),
        entry("head", x.copy()),
        entry("head_t", np.ascontiguousarray(x.T)),
        entry("copy2", x.copy()),
    ]
    found = find_equal(entries)
    assert [[e.name for e in g] for g in found.groups] == [["emb", "head", "copy2"]]
    pairs = {(a.name, b.name) for a, b in found.transposed}
    assert ("emb", "head_t") in pairs
    assert all("unrelated" not in p for p in pairs)
    assert found.unconfirmed == set()


def test_find_equal_never_matches_constant_tensors() -> None:
    entries = [entry(n, np.zeros((4, 4), np.float32)) for n in ("a", "b", "c")]
    entries += [entry("d", np.ones((4, 4), np.float32)), entry("e", np.ones((4, 4)))]
    found = find_equal(entries)
    assert found.groups == [] and found.transposed == []


def test_find_equal_pairs_two_copies_only_when_equal_in_full() -> None:
    x = seeded(12, 10, 10)
    unsampled = next(i for i in range(100) if i not in sample_positions(100))
    found = find_equal([entry("a", x), entry("b", changed(x, unsampled))])
    assert found.groups == []  # the samples agree, the whole tensors do not


def test_first_different_names_the_first_other_that_differs_reading_each_once() -> None:
    base = seeded(3, 64, 32)
    a = entry("a", base)
    same, other = entry("same", base.copy()), entry("other", changed(base, 2047))
    assert first_different(a, [same, entry("same2", base.copy())]) is None
    assert first_different(a, [same, other, entry("same3", base.copy())]) == 1
    assert first_different(a, [other, same]) == 0
    assert first_different(a, [entry("short", base[:-1])]) == 0  # another size differs
    fresh = entry("a", base)
    assert first_different(fresh, [entry("x", base.copy()), entry("y", base.copy())]) is None
    assert fresh.blob.bytes_read == base.nbytes  # one pass over ``a`` for both


def test_two_names_of_one_stored_range_are_equal_without_a_read(tmp_path: Path) -> None:
    """A pickle's shared storage gives two names the very same bytes of the file: equal
    without comparing them; a copy of those bytes elsewhere in the file is still read."""
    base = seeded(4, 64, 32)
    raw = base.tobytes()
    path = tmp_path / "two.bin"
    path.write_bytes(raw + raw + changed(base, 5).tobytes())
    file = ByteFile(path)
    try:
        n = len(raw)

        def at(name: str, start: int) -> Entry:
            return Entry(name, "F32", base.shape, n, FileBlob(file, start, n))

        source, alias, copy, drifted = at("s", 0), at("a", 0), at("c", n), at("d", 2 * n)
        assert first_different(source, [alias]) is None
        assert file.bytes_read == 0  # nothing read for the same range
        assert equal(source, alias) and file.bytes_read <= SAMPLES * 4 * 2  # samples only
        read_before = file.bytes_read
        assert first_different(source, [alias, copy]) is None
        assert file.bytes_read - read_before == 2 * n  # the copy compared, the alias not
        assert first_different(source, [alias, drifted, copy]) == 1
        assert first_different(source, [alias, copy, drifted]) == 2
    finally:
        file.close()
