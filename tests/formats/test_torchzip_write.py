"""How a torch zip is rewritten without torch: records kept as they were copied in
runs, an untied copy copied from its source, every copied byte compared as it lands."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch

import tiecli
from tiecli.formats.torchzip_write import _merge

MB = 1 << 20


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    sd = {"model.embed_tokens.weight": torch.randn(1024, 512, generator=g)}  # 2 MiB each
    for i in range(3):
        sd[f"model.layers.{i}.mlp.weight"] = torch.randn(1024, 512, generator=g)
    sd["model.norm.weight"] = torch.randn(512, generator=g)
    return sd


def _kernel_copies(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(input offset, size) of each range the writer hands to the kernel to copy."""
    from tiecli.io import writes

    real = writes.copy_range
    calls: list[tuple[int, int]] = []

    def copy_range(src, dst, src_off, dst_off, count, *rest, **kw):
        calls.append((src_off, count))
        return real(src, dst, src_off, dst_off, count, *rest, **kw)

    monkeypatch.setattr(writes, "copy_range", copy_range)
    return calls


def _data_offsets(path: Path) -> dict[str, tuple[int, int, int]]:
    """Each record's (data offset, size, CRC), by its name inside the archive folder."""
    out = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            f.seek(info.header_offset + 26)
            name_len, extra_len = (
                int.from_bytes(f.read(2), "little"),
                int.from_bytes(f.read(2), "little"),
            )
            start = info.header_offset + 30 + name_len + extra_len
            out[info.filename.split("/", 1)[1]] = (start, info.file_size, info.CRC)
    return out


def _torch_reads(path: Path) -> None:
    """torch loads ``path`` onto the meta device (offsets it computes from the layout
    checked against the file's) and the archive's checksums all hold."""
    env = dict(os.environ, TORCH_SERIALIZATION_DEBUG="1")
    check = f"import torch; torch.load({str(path)!r}, weights_only=True, map_location='meta')"
    subprocess.run([sys.executable, "-c", check], check=True, env=env, timeout=120)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None


def test_records_kept_as_they_were_are_copied_in_one_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sd = _state_dict()
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()  # last: nothing renamed
    src, out = tmp_path / "in.bin", tmp_path / "out.bin"
    torch.save(sd, src)
    calls = _kernel_copies(monkeypatch)
    assert [t.alias for t in tiecli.dedupe(src, out).removed] == ["lm_head.weight"]

    records = _data_offsets(src)
    kept = [records[f"data/{i}"] for i in range(5)]
    first, last = kept[0], kept[-1]
    # one range through the last kept record's end, from the first kept record's data
    # (or before: the small records ahead of it), the headers between them included
    assert len(calls) == 1, calls
    at, size = calls[0]
    assert at <= first[0] and at + size == last[0] + last[1]
    _torch_reads(out)
    after = torch.load(out, weights_only=True)
    assert all(torch.equal(after[k], sd[k]) for k in sd)
    assert after["lm_head.weight"].data_ptr() == after["model.embed_tokens.weight"].data_ptr()


def test_untie_copies_the_source_record_again_with_its_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sd = _state_dict()
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # one storage
    src, out = tmp_path / "in.bin", tmp_path / "out.bin"
    torch.save(sd, src)
    calls = _kernel_copies(monkeypatch)
    assert [t.alias for t in tiecli.untie(src, out).restored] == ["lm_head.weight"]

    before, after = _data_offsets(src), _data_offsets(out)
    embed = before["data/0"]
    assert len(calls) == 2 and calls[1] == embed[:2]  # the copy: its source record again
    assert after["data/5"][1:] == embed[1:]  # same size, and the source's CRC
    _torch_reads(out)
    loaded = torch.load(out, weights_only=True)
    head, source = loaded["lm_head.weight"], loaded["model.embed_tokens.weight"]
    assert torch.equal(head, source) and torch.equal(head, sd["lm_head.weight"])
    assert head.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()


class _Bytes:
    def __init__(self, data: bytes):
        self.data = data

    def pread(self, at: int, size: int) -> bytes:
        return self.data[at : at + size]


def test_ranges_join_only_across_bytes_the_input_holds_there() -> None:
    src = _Bytes(b"HDR1" + b"a" * 8 + b"DESCHDR2" + b"b" * 8 + b"DESC")
    same = [b"HDR1", (4, 8), b"DESC", b"HDR2", (20, 8), b"DESC"]
    assert _merge(src, same) == [b"HDR1", (4, 24), b"DESC"]
    renamed = [b"HDR1", (4, 8), b"DESC", b"HDR9", (20, 8), b"DESC"]
    assert _merge(src, renamed) == [b"HDR1", (4, 8), b"DESCHDR9", (20, 8), b"DESC"]
    apart = [b"HDR1", (4, 8), b"DESC", b"HDR2", (21, 7), b"DESC"]
    assert _merge(src, apart) == [b"HDR1", (4, 8), b"DESCHDR2", (21, 7), b"DESC"]


def test_a_header_damaged_inside_a_run_fails_verification(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run carries the headers between its records: they are compared too."""
    sd = _state_dict()
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    src, out = tmp_path / "in.bin", tmp_path / "out.bin"
    torch.save(sd, src)
    with zipfile.ZipFile(src) as z:
        header = next(i.header_offset for i in z.infolist() if i.filename.endswith("data/2"))
    real = os.copy_file_range
    flipped: list[int] = []

    def copy_file_range(s, d, count, src_off=None, dst_off=None):
        n = real(s, d, count, src_off, dst_off)
        if src_off <= header < src_off + n:  # the local header's signature, flipped
            os.pwrite(d, b"Q", dst_off + header - src_off)
            flipped.append(header)
        return n

    monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    with pytest.raises(tiecli.TiecliError, match="verification failed") as e:
        tiecli.dedupe(src, out)
    assert flipped and e.value.exit_code == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.bin"]


def test_the_follower_compares_a_record_while_it_is_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step of a long copy waits until the follower has compared something of the
    record being copied: a follower that waited for the whole record never would."""
    from tiecli import values
    from tiecli.io import writes

    monkeypatch.setattr(writes, "COPY_STEP", MB)
    monkeypatch.setattr(values, "CHUNK", MB)
    compared = threading.Event()
    real_same = values._same_memory

    def same_memory(*args):
        compared.set()
        return real_same(*args)

    monkeypatch.setattr(values, "_same_memory", same_memory)
    real = os.copy_file_range
    waited: list[bool] = []

    def copy_file_range(s, d, count, src_off=None, dst_off=None):
        if len(waited) < 2:
            # the first steps: the one that ends at an aligned offset and one whole step,
            # before which no whole piece of the record is written to compare
            waited.append(True)
        elif all(waited):
            waited.append(compared.wait(5))
        compared.clear()
        return real(s, d, count, src_off, dst_off)

    sd = _state_dict()
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    src, out = tmp_path / "in.bin", tmp_path / "out.bin"
    torch.save(sd, src)
    monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    tiecli.untie(src, out)
    assert len(waited) > 8 and all(waited), waited
    loaded = torch.load(out, weights_only=True)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_the_most_bytes_copied_keep_their_offset_within_a_page(tmp_path: Path) -> None:
    """A record left out moves every record after it: the spaces after the pickle put
    back in place the records holding the most bytes, not the single largest one."""
    g = torch.Generator().manual_seed(7)
    embed = torch.randn(2048, 512, generator=g)  # 4 MiB
    sd = {"model.embed_tokens.weight": embed, "lm_head.weight": embed.clone()}
    for i in range(3):  # 6 MiB after the head
        sd[f"model.layers.{i}.mlp.weight"] = torch.randn(1024, 512, generator=g)
    src, out = tmp_path / "in.bin", tmp_path / "out.bin"
    torch.save(sd, src)
    assert [t.alias for t in tiecli.dedupe(src, out).removed] == ["lm_head.weight"]

    before, after = _data_offsets(src), _data_offsets(out)
    moved = [(before[f"data/{i + 1}"][0], after[f"data/{i}"][0]) for i in range(1, 4)]
    assert all(a % 4096 == b % 4096 for a, b in moved), moved
    assert before["data/0"][0] % 4096 != after["data/0"][0] % 4096  # the smaller part
    _torch_reads(out)
    loaded = torch.load(out, weights_only=True)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert not tiecli.dedupe(out).changed


def test_many_small_records_are_written_a_bounded_piece_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records too small to copy in the kernel, none of them where it was (the head
    left out comes first): what is written at once stays near COPY_FROM."""
    from tiecli.formats import torchzip_write
    from tiecli.io import writes

    monkeypatch.setattr(torchzip_write, "COPY_FROM", 64 << 10)
    real = writes.write_all
    sizes: list[int] = []

    def write_all(fd, data, offset):
        sizes.append(len(data))
        return real(fd, data, offset)

    monkeypatch.setattr(writes, "write_all", write_all)
    g = torch.Generator().manual_seed(9)
    embed = torch.randn(64, 64, generator=g)
    sd = {"lm_head.weight": embed.clone(), "model.embed_tokens.weight": embed}
    for i in range(200):  # 8 KiB each, 1.6 MiB in all
        sd[f"model.layers.{i}.mlp.weight"] = torch.randn(32, 64, generator=g)
    src, out = tmp_path / "in.bin", tmp_path / "out.bin"
    torch.save(sd, src)
    assert [t.alias for t in tiecli.dedupe(src, out).removed] == ["lm_head.weight"]
    assert sum(sizes) == out.stat().st_size and len(sizes) > 10
    assert max(sizes) < 2 * (64 << 10), sizes  # of 1.6 MiB written
    loaded = torch.load(out, weights_only=True)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_a_durable_rewrite_starts_the_disk_on_each_piece_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--fsync (and in place): the disk is asked to start on what is copied as it is
    copied, so the fsync that ends the write has little left; a plain -o asks nothing."""
    from tiecli.io import writes

    started: list[int] = []
    real = writes.start_writeback
    monkeypatch.setattr(
        writes, "start_writeback", lambda fd, at, n: (started.append(n), real(fd, at, n))[1]
    )
    calls = _kernel_copies(monkeypatch)
    sd = _state_dict()
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    src = tmp_path / "in.bin"
    torch.save(sd, src)

    tiecli.dedupe(src, tmp_path / "plain.bin")
    assert started == [] and calls
    copied = sum(n for _at, n in calls)
    calls.clear()
    tiecli.dedupe(src, tmp_path / "durable.bin", fsync=True)
    assert sum(started) == copied == sum(n for _at, n in calls)
    loaded = torch.load(tmp_path / "durable.bin", weights_only=True)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_a_checksum_damaged_in_the_central_directory_fails_verification(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes written from memory (headers, descriptors, the central directory with each
    record's CRC) are read back too: a flipped CRC byte there, which every tensor read
    would miss and only ``zipfile.testzip`` would see, fails the rewrite."""
    from tiecli.io import writes

    sd = _state_dict()
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    src, out = tmp_path / "in.bin", tmp_path / "out.bin"
    torch.save(sd, src)
    real = writes.write_all
    flipped: list[int] = []

    def write_all(fd: int, data: bytes, at: int, *rest, **kw):  # noqa: ANN002, ANN003, ANN202
        n = real(fd, data, at, *rest, **kw)
        where = bytes(data).find(b"PK\x01\x02")  # a central directory entry
        if where >= 0 and not flipped:
            crc = at + where + 16  # its CRC-32 field
            os.pwrite(fd, bytes([data[where + 16] ^ 0xFF]), crc)
            flipped.append(crc)
        return n

    monkeypatch.setattr(writes, "write_all", write_all)
    with pytest.raises(tiecli.TiecliError, match="archive structure") as e:
        tiecli.dedupe(src, out)
    assert flipped and e.value.exit_code == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.bin"]
