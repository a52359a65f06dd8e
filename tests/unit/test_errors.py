"""Parameter names inside messages: Python callers read ``max_shard_size``, the CLI ``--max-shard-size``."""

from __future__ import annotations

import pytest

from tiecli.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    OutputError,
    TiecliError,
    UnsafeChangeError,
    UsageError,
    as_flag,
    as_python,
    param,
    spell,
)


def test_a_marked_parameter_reads_as_its_python_name_by_default() -> None:
    text = f"use {param('max_shard_size')} or {param('min_bytes')}"
    assert spell(text) == "use max_shard_size or min_bytes"
    assert spell(text, as_python) == spell(text)


def test_a_marked_parameter_reads_as_its_flag_on_the_command_line() -> None:
    text = f"use {param('max_shard_size')} or {param('min_bytes')}"
    assert spell(text, as_flag) == "use --max-shard-size or --min-bytes"


@pytest.mark.parametrize(
    ("name", "flag"), [("to", "--to"), ("by_value", "--by-value"), ("untie_head", "--untie-head")]
)
def test_as_flag(name: str, flag: str) -> None:
    assert as_flag(name) == flag


def test_the_mark_is_invisible_to_message_spacing() -> None:
    """Messages are re-spaced word by word; a marked name stays one word."""
    e = UsageError(f"pass   {param('by_value')}\n  to remove duplicates")
    assert e.one_line() == "pass by_value to remove duplicates"
    assert e.one_line(as_flag) == "pass --by-value to remove duplicates"
    assert str(e) == "pass by_value to remove duplicates"  # what a Python caller sees


def test_unmarked_text_is_left_alone() -> None:
    text = "tensor lm_head.weight: by_value is a word here, not a parameter"
    assert spell(text, as_flag) == text


def test_one_line_names_the_path_and_the_fix() -> None:
    e = CheckpointFormatError(
        "truncated header", "/m/model.safetensors", hint=f"pass {param('to')}"
    )
    assert e.one_line() == "/m/model.safetensors: truncated header; pass to"
    assert e.one_line(as_flag) == "/m/model.safetensors: truncated header; pass --to"
    assert e.path == "/m/model.safetensors" and e.hint == "pass " + param("to")


@pytest.mark.parametrize(
    ("cls", "builtin", "code"),
    [
        (CheckpointNotFoundError, FileNotFoundError, 2),
        (CheckpointFormatError, ValueError, 2),
        (OutputError, OSError, 2),
        (UsageError, ValueError, 2),
        (UnsafeChangeError, RuntimeError, 1),
    ],
)
def test_each_error_is_also_the_matching_builtin(cls: type, builtin: type, code: int) -> None:
    e = cls("went wrong", "x.bin")
    assert isinstance(e, TiecliError) and isinstance(e, builtin)
    assert e.exit_code == code
    assert str(e) == "x.bin: went wrong"
