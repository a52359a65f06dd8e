"""New output files get their size, and their blocks where the file system can
reserve them, before any byte is written (tiecli/io/writes.py ``create``)."""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from tiecli.io import clib, writes

SIZE = 8 << 20


def _fake_fallocate(err: int) -> Any:
    """A stand-in for the C library's ``fallocate`` that fails with ``err``."""

    def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
        ctypes.set_errno(err)
        return -1

    return fallocate


def _reads_zeros(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read() == bytes(SIZE)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fallocate is Linux's")
def test_create_reserves_every_block(tmp_path: Path) -> None:
    path = tmp_path / "out"
    probe = os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT)
    try:  # the call itself, on another file: can this file system reserve blocks at all?
        # (not os.posix_fallocate, which the C library emulates where the call is missing)
        reserved = writes._reserve(probe, 4096)
        st = os.fstat(probe)
    finally:
        os.close(probe)
    if not reserved:
        pytest.skip("this file system (or system) cannot reserve blocks")
    if st.st_blocks == 0:
        pytest.skip("this file system does not count reserved blocks")
    fd = writes.create(path, SIZE)
    os.close(fd)
    st = path.stat()
    assert st.st_size == SIZE
    assert st.st_blocks * 512 >= SIZE  # reserved, not a sparse file
    assert _reads_zeros(path)


def test_create_refuses_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "out"
    path.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        writes.create(path, SIZE)
    assert path.read_bytes() == b"keep"


@pytest.mark.parametrize("err", [errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL])
def test_create_without_reserving_sizes_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    """A file system (or system) without the call: the file is only sized."""
    monkeypatch.setitem(clib.FOUND, "fallocate64", _fake_fallocate(err))
    path = tmp_path / "out"
    os.close(writes.create(path, SIZE))
    assert path.stat().st_size == SIZE
    assert _reads_zeros(path)


def test_create_where_there_is_no_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(clib.FOUND, "fallocate64", None)
    path = tmp_path / "out"
    os.close(writes.create(path, SIZE))
    assert path.stat().st_size == SIZE


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
def test_create_on_a_full_disk_raises_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    monkeypatch.setitem(clib.FOUND, "fallocate64", _fake_fallocate(err))
    with pytest.raises(OSError) as e:
        writes.create(tmp_path / "out", SIZE)
    assert e.value.errno == err
    assert (tmp_path / "out").stat().st_size == 0  # nothing written; the caller removes it


def test_create_of_an_empty_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[int] = []
    monkeypatch.setitem(clib.FOUND, "fallocate64", lambda *a: called.append(1) or 0)
    os.close(writes.create(tmp_path / "out", 0))
    assert (tmp_path / "out").stat().st_size == 0 and not called
