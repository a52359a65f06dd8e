"""tiecli.arch.storage on in-memory tensors and pickle entries: one answer for both."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiecli.arch.storage import relation, same_storage, where
from tiecli.checkpoint import Entry


def _entry(
    name: str,
    shape: tuple[int, ...],
    storage: tuple[int, int] | None = (0, 96),
    view: tuple[int, tuple[int, ...]] | None = None,
    dtype: str = "F32",
    file: str = "model.bin",
) -> Entry:
    if view is None and storage is not None:
        view = (0, (shape[1], 1) if len(shape) == 2 else (1,))
    nbytes = 4 * int(torch.tensor(shape).prod()) if shape else 4
    return Entry(name, dtype, shape, nbytes, None, storage, view, Path(file))  # type: ignore[arg-type]


# -- torch tensors --------------------------------------------------------------


def test_a_tensor_and_its_alias_are_identity() -> None:
    t = torch.randn(4, 3)
    assert relation(t, t) == "identity"
    assert relation(t, t.view(4, 3)) == "identity"
    assert same_storage(t, t[:])


def test_a_transposed_view_is_transpose_both_ways() -> None:
    t = torch.randn(4, 3)
    assert relation(t, t.t()) == "transpose"
    assert relation(t.t(), t) == "transpose"
    assert same_storage(t.t(), t)


def test_a_copy_is_not_a_tie() -> None:
    t = torch.randn(4, 3)
    assert relation(t, t.clone()) is None
    assert not same_storage(t, t.clone())
    assert relation(t, t.t().contiguous()) is None  # equal values, separate memory


def test_overlapping_views_that_are_neither_are_not_ties() -> None:
    t = torch.randn(4, 3)
    assert relation(t, t[:2]) is None  # same start, other shape
    assert relation(t, t[1:]) is None  # other offset
    assert relation(t, t.view(3, 4)) is None  # same bytes read with another shape
    assert relation(t, t.view(torch.int32)) is None  # same bytes read as another dtype
    assert relation(t[1], t[2]) is None  # rows of one storage


def test_where_names_the_memory_and_byte_offset() -> None:
    t = torch.zeros(4, 3, dtype=torch.float16)
    place, storage, offset, dtype = where(t[2])  # type: ignore[misc]
    assert place == "cpu"
    assert storage == t.untyped_storage().data_ptr()
    assert offset == 2 * 3 * 2
    assert dtype == torch.float16


# -- pickle entries -------------------------------------------------------------


def test_entries_viewing_one_storage_alike_are_identity() -> None:
    a, b = _entry("a", (4, 3)), _entry("b", (4, 3))
    assert relation(a, b) == "identity"
    assert same_storage(a, b)


def test_entries_with_reversed_shape_and_strides_are_transpose() -> None:
    a = _entry("a", (4, 3), view=(0, (3, 1)))
    b = _entry("b", (3, 4), view=(0, (1, 3)))
    assert relation(a, b) == "transpose"
    assert relation(b, a) == "transpose"


@pytest.mark.parametrize(
    ("b", "why"),
    [
        (_entry("b", (4, 3), storage=(1, 96)), "another storage"),
        (_entry("b", (4, 3), view=(12, (3, 1))), "another offset"),
        (_entry("b", (4, 3), dtype="I32"), "another dtype"),
        (_entry("b", (2, 3)), "another shape"),
        (_entry("b", (4, 3), view=(0, (1, 4))), "other strides"),
        (_entry("b", (4, 3), file="other.bin"), "storage key of another file"),
    ],
)
def test_entries_that_are_not_one_view(b: Entry, why: str) -> None:
    assert relation(_entry("a", (4, 3)), b) is None, why


def test_entries_outside_a_pickle_have_no_storage() -> None:
    a = _entry("a", (4, 3), storage=None)
    assert where(a) is None
    assert relation(a, a) is None
    assert not same_storage(a, _entry("b", (4, 3)))


def test_a_tensor_and_an_entry_never_match() -> None:
    t = torch.randn(4, 3)
    assert relation(t, _entry("a", (4, 3))) is None
