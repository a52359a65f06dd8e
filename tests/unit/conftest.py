"""Fixtures of the unit tests: entries and checkpoints built in memory (see in_memory.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from in_memory import make_checkpoint, make_entry

from tiecli.checkpoint import Checkpoint, Entry


@pytest.fixture
def entry() -> Callable[..., Entry]:
    """``entry(name, array)``: see :func:`make_entry`."""
    return make_entry


@pytest.fixture
def checkpoint() -> Callable[..., Checkpoint]:
    """``checkpoint(*entries, config=..., metadata=...)``: see :func:`make_checkpoint`."""
    return make_checkpoint
