"""Unwritable outputs, full disks, outputs that are the input: clear errors, input intact."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import error_line, fixture_path, snapshot
from typer.testing import CliRunner

import tiecli
from tiecli.cli import app

runner = CliRunner()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    shutil.copytree(fixture_path("llama-tied", "full-sharded"), tmp_path / "ckpt")
    return tmp_path


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.mark.parametrize("command", ["dedupe", "untie"])
def test_read_only_folder_in_place(work: Path, command: str) -> None:
    ckpt = work / "ckpt"
    if command == "untie":
        tiecli.dedupe(ckpt)
    before = snapshot(work)
    os.chmod(ckpt, 0o555)
    try:
        if _is_root():  # root ignores permissions; inject what a read-only folder would say
            real = os.open

            def deny(path, flags, *a, **k):
                if flags & os.O_CREAT:
                    raise PermissionError(errno.EACCES, "Permission denied", path)
                return real(path, flags, *a, **k)

            mp = pytest.MonkeyPatch()
            mp.setattr(os, "open", deny)
        r = runner.invoke(app, [command, str(ckpt)])
    finally:
        if _is_root():
            mp.undo()
        os.chmod(ckpt, 0o755)
    assert r.exit_code == 2
    assert "cannot write here" in error_line(r)
    assert snapshot(work) == before


@pytest.mark.parametrize("target", ["file", "sharded"])
@pytest.mark.parametrize("command", ["dedupe", "untie"])
def test_disk_full_leaves_input_intact(
    work: Path, monkeypatch: pytest.MonkeyPatch, command: str, target: str
) -> None:
    import tiecli.formats.safetensors as st

    if target == "file":
        shutil.copytree(fixture_path("gpt2", "full"), work / "single")
        path = work / "single" / "model.safetensors"
    else:
        path = work / "ckpt"
    if command == "untie":
        tiecli.dedupe(path)
    before = snapshot(work)
    calls = {"n": 0}

    def full(fd, data, offset):
        calls["n"] += 1
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st.os, "pwrite", full)
    monkeypatch.setattr(
        st.os, "copy_file_range", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
    )
    r = runner.invoke(app, [command, str(path)])
    assert r.exit_code == 2
    assert "no space left on device" in error_line(r)
    assert snapshot(work) == before  # no temporaries left either


def test_disk_full_with_output_leaves_nothing(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tiecli.formats.safetensors as st

    monkeypatch.setattr(
        st.os, "copy_file_range", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
    )
    before = snapshot(work)
    r = runner.invoke(app, ["dedupe", str(work / "ckpt"), "-o", str(work / "out")])
    assert r.exit_code == 2 and "no space" in error_line(r)
    assert snapshot(work) == before


@pytest.mark.parametrize("form", ["sharded", "single", "bin"])
@pytest.mark.parametrize("where", ["in-place", "-o"])
def test_disk_too_small_fails_at_the_reservation(
    work: Path, monkeypatch: pytest.MonkeyPatch, form: str, where: str
) -> None:
    """The output's blocks are reserved before a byte is written: a disk without room
    fails there, with the usual line, and nothing is left behind."""
    import ctypes

    from tiecli.io import clib, writes

    inputs = {
        "sharded": work / "ckpt",
        "single": fixture_path("gpt2", "full") / "model.safetensors",
        "bin": fixture_path("llama-tied", "bin") / "pytorch_model.bin",
    }
    if form != "sharded":
        shutil.copy(inputs[form], work / inputs[form].name)
        inputs[form] = work / inputs[form].name
    asked: list[int] = []

    def full(fd: int, mode: int, offset: int, length: int) -> int:
        asked.append(length)
        ctypes.set_errno(errno.ENOSPC)
        return -1

    monkeypatch.setitem(clib.FOUND, "fallocate64", full)
    pwrites: list[int] = []
    real_pwrite = os.pwrite
    monkeypatch.setattr(
        writes.os,
        "pwrite",
        lambda *a: pwrites.append(1) or real_pwrite(*a),  # type: ignore[func-returns-value]
    )
    before = snapshot(work)
    out = [] if where == "in-place" else ["-o", str(work / "out")]
    command = "untie" if form == "bin" else "dedupe"  # that .bin is stored tied
    r = runner.invoke(app, [command, str(inputs[form]), *out])
    assert r.exit_code == 2, r.output
    assert "no space left on device" in error_line(r)
    assert asked and asked[0] > 0 and not pwrites  # refused before any byte was written
    assert snapshot(work) == before


def _small_fs(tmp_path: Path) -> Path | None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    ok = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mnt)], capture_output=True
    )
    return mnt if ok.returncode == 0 else None


def test_real_small_filesystem(tmp_path: Path) -> None:
    mnt = _small_fs(tmp_path)
    if mnt is None:
        pytest.skip("cannot mount a tmpfs here (needs root in a namespace that allows it)")
    try:
        shutil.copytree(fixture_path("t5", "full"), mnt / "t5")  # 40 KB of 48 KB
        before = snapshot(mnt)
        r = runner.invoke(app, ["dedupe", str(mnt / "t5")])
        if r.exit_code == 0:  # it fitted: the result must be right
            assert tiecli.verify(mnt / "t5").ok
        else:
            assert r.exit_code == 2 and "no space left" in error_line(r)
            assert snapshot(mnt) == before
        r = runner.invoke(app, ["untie", str(fixture_path("t5", "hf")), "-o", str(mnt / "untied")])
        assert r.exit_code == 2 and "no space left" in error_line(r)
        assert not (mnt / "untied").exists()
        assert not [p for p in mnt.iterdir() if "tiecli" in p.name]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.parametrize("command", ["dedupe", "untie"])
def test_output_that_is_the_input_through_a_symlink(work: Path, command: str) -> None:
    link = work / "link"
    link.symlink_to(work / "ckpt")
    before = snapshot(work / "ckpt")
    r = runner.invoke(app, [command, str(work / "ckpt"), "-o", str(link), "--force"])
    assert r.exit_code == 2
    assert "is the input itself" in error_line(r)
    assert snapshot(work / "ckpt") == before


def test_output_file_that_is_the_input_file(tmp_path: Path) -> None:
    shutil.copytree(fixture_path("gpt2", "full"), tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    (tmp_path / "alias.safetensors").symlink_to(f)
    before = f.read_bytes()
    r = runner.invoke(app, ["dedupe", str(f), "-o", str(tmp_path / "alias.safetensors"), "--force"])
    assert r.exit_code == 2 and "is the input itself" in error_line(r)
    assert f.read_bytes() == before


def test_existing_output_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = runner.invoke(app, ["dedupe", str(fixture_path("gpt2", "full")), "-o", str(out)])
    assert r.exit_code == 2 and "--force" in error_line(r)
    assert (out / "keep.txt").read_text() == "mine"
    r = runner.invoke(app, ["dedupe", str(fixture_path("gpt2", "full")), "-o", str(out), "--force"])
    assert r.exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_output_parent_missing(tmp_path: Path) -> None:
    r = runner.invoke(
        app, ["dedupe", str(fixture_path("gpt2", "full")), "-o", str(tmp_path / "no" / "out")]
    )
    assert r.exit_code == 2 and "parent folder does not exist" in error_line(r)


def test_cleanup_touches_only_its_own_targets(tmp_path: Path) -> None:
    """A run cleans the temporaries of the files it writes, never another run's."""
    shutil.copytree(fixture_path("gpt2", "full"), tmp_path / "m")
    other = tmp_path / ".other.safetensors.tiecli-tmp"  # another run writing other.safetensors
    other.write_bytes(b"in progress")
    mine = tmp_path / ".out.safetensors.tiecli-tmp"  # left by an interrupted run of this target
    mine.write_bytes(b"half")
    r = runner.invoke(
        app,
        [
            "dedupe",
            str(tmp_path / "m" / "model.safetensors"),
            "-o",
            str(tmp_path / "out.safetensors"),
        ],
    )
    assert r.exit_code == 0, r.stderr
    assert other.exists() and not mine.exists()


def test_output_inside_or_around_the_input_folder_is_refused(work: Path) -> None:
    before = snapshot(work)
    r = runner.invoke(app, ["dedupe", str(work / "ckpt"), "-o", str(work / "ckpt" / "out")])
    assert r.exit_code == 2 and "inside the input folder" in error_line(r)
    r = runner.invoke(app, ["dedupe", str(work / "ckpt"), "-o", str(work), "--force"])
    assert r.exit_code == 2 and "contains the input checkpoint" in error_line(r)
    assert snapshot(work) == before


@pytest.mark.parametrize("command", ["dedupe", "untie"])
def test_in_place_rewrite_keeps_file_permissions(tmp_path: Path, command: str) -> None:
    shutil.copytree(fixture_path("gpt2", "full"), tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    if command == "untie":
        tiecli.dedupe(f)
    os.chmod(f, 0o600)
    before = f.stat().st_ino
    r = runner.invoke(app, [command, str(f)])
    assert r.exit_code == 0, r.stderr
    assert f.stat().st_ino != before  # it was rewritten
    assert (f.stat().st_mode & 0o777) == 0o600


def _corrupting_copy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every kernel copy lands one flipped byte in the output, as a bad copy would
    (flipped before the copy returns: a reader following the writer sees it)."""
    real = os.copy_file_range
    calls: list[int] = []

    def copy_file_range(src, dst, count, src_off=None, dst_off=None):
        n = real(src, dst, count, src_off, dst_off)
        if n > 0:
            os.pwrite(dst, bytes([os.pread(src, 1, src_off)[0] ^ 0xFF]), dst_off)
            calls.append(n)
        return n

    monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    return calls


@pytest.mark.parametrize("form", ["full", "full-sharded"])
@pytest.mark.parametrize("in_place", [True, False])
def test_written_bytes_that_differ_are_never_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str, in_place: bool
) -> None:
    src = fixture_path("llama-tied", form)
    ckpt = tmp_path / "in" / src.name
    if src.is_dir():
        shutil.copytree(src, ckpt)
    else:
        ckpt.parent.mkdir()
        shutil.copy2(src, ckpt)
    before = snapshot(tmp_path)
    calls = _corrupting_copy(monkeypatch)
    args = ["dedupe", str(ckpt)] + ([] if in_place else ["-o", str(tmp_path / "out")])
    r = runner.invoke(app, args)
    assert r.exit_code == 1, r.output
    line = error_line(r)
    assert "verification failed" in line and "nothing was changed" in line, line
    assert calls, "the corrupting copy was never used"
    assert snapshot(tmp_path) == before  # no output, no temporaries, input as it was


def test_verification_stops_the_writer_early(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mismatch found while the file is still being written ends the write there."""
    import time

    from tiecli.io import writes

    ckpt = tmp_path / "model.safetensors"
    shutil.copy2(fixture_path("llama-tied", "full") / "model.safetensors", ckpt)
    monkeypatch.setattr(writes, "COPY_STEP", 1024)  # many small, slow steps
    real = os.copy_file_range
    copied: list[int] = []

    def slow_bad_copy(src, dst, count, src_off, dst_off):
        time.sleep(0.02)
        n = real(src, dst, count, src_off, dst_off)
        os.pwrite(dst, bytes([os.pread(src, 1, src_off)[0] ^ 0xFF]), dst_off)
        copied.append(n)
        return n

    monkeypatch.setattr(os, "copy_file_range", slow_bad_copy)
    with pytest.raises(tiecli.TiecliError, match="verification failed"):
        tiecli.dedupe(ckpt, tmp_path / "out.safetensors")
    assert 0 < sum(copied) < os.path.getsize(ckpt) // 2, copied
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def _cloned_head_bin(folder: Path) -> Path:
    import torch

    folder.mkdir()
    sd = torch.load(fixture_path("llama-tied", "bin") / "pytorch_model.bin", weights_only=True)
    sd["lm_head.weight"] = sd["lm_head.weight"].clone()
    torch.save(sd, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("path", ["torch-free", "torch"])
def test_pickle_written_wrong_is_never_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    import torch

    ckpt = _cloned_head_bin(tmp_path / "in")
    before = snapshot(tmp_path)
    if path == "torch-free":
        from tiecli.formats import torchzip_write

        monkeypatch.setattr(torchzip_write, "COPY_FROM", 0)  # every record copied in the kernel
        calls = _corrupting_copy(monkeypatch)
    else:
        from tiecli.formats import torchzip

        monkeypatch.setattr(torchzip, "open_torchzip", lambda *a: None)  # torch reads, saves
        real_save = torch.save
        calls = []

        def bad_save(obj, f, *args, **kw):
            calls.append(1)
            obj = dict(obj)
            name = sorted(obj)[0]
            obj[name] = obj[name].clone() + 1
            return real_save(obj, f, *args, **kw)

        monkeypatch.setattr(torch, "save", bad_save)
    r = runner.invoke(app, ["dedupe", str(ckpt), "-o", str(tmp_path / "out")])
    assert r.exit_code == 1, r.output
    assert "verification failed" in error_line(r)
    assert calls
    assert snapshot(tmp_path) == before


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the files and folders fsynced from now on."""
    real = os.fsync
    synced: list[str] = []

    def fsync(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
@pytest.mark.parametrize("form", ["full", "full-sharded"])
def test_what_is_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str) -> None:
    """Replacing anything is durable first; a new -o output is durable on request."""
    from tiecli.io import writes

    src = fixture_path("llama-tied", form)
    started: list[int] = []
    real_start = writes.start_writeback
    monkeypatch.setattr(
        writes, "start_writeback", lambda *a: (started.append(a[2]), real_start(*a))[1]
    )
    synced = _record_fsyncs(monkeypatch)

    tiecli.dedupe(src, tmp_path / "new")
    assert synced == [] and started == []  # like cp: nothing forced to disk

    tiecli.dedupe(src, tmp_path / "synced", fsync=True)
    assert any(".tiecli-tmp" in n for n in synced) and started, synced
    assert "synced" in synced or tmp_path.name in synced  # the folder holding the rename

    synced.clear()
    started.clear()
    tiecli.dedupe(src, tmp_path / "new", force=True)  # replaces an output: durable
    assert synced and started
    if form == "full":  # the folder's other files too, before the old folder goes
        assert "config.json" in synced, synced

    ckpt = tmp_path / "in"
    shutil.copytree(src, ckpt)
    synced.clear()
    tiecli.dedupe(ckpt)  # in place: every new file synced before its rename
    written = {p.name for p in ckpt.iterdir() if p.name.endswith((".safetensors", ".json"))}
    changed = {_target_of(n) for n in synced if "tmp" in n}
    assert changed and changed <= written and "in" in synced, synced


def test_a_writer_that_ends_short_fails_verification(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is sized before it is written: a copy that stops early without an error
    leaves zeros a reader would accept as data. The follower must notice."""
    from tiecli.io import writes

    real = writes.copy_range

    def half(src, dst, src_off, dst_off, count, *rest):
        return real(src, dst, src_off, dst_off, count // 2, *rest)

    monkeypatch.setattr(writes, "copy_range", half)
    src = fixture_path("llama-tied", "full") / "model.safetensors"
    with pytest.raises(tiecli.TiecliError, match="verification failed") as e:
        tiecli.dedupe(src, tmp_path / "out.safetensors")
    assert e.value.exit_code == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_save_syncs_only_what_replaces_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    synced = _record_fsyncs(monkeypatch)
    sd = {"w": torch.randn(4, 4)}
    target = tmp_path / "m.safetensors"
    tiecli.save(sd, target)
    assert synced == []  # a new file: as durable as save_file's
    tiecli.save(sd, target)
    assert [_target_of(n) for n in synced if "tmp" in n] == ["m.safetensors"], synced
    assert tmp_path.name in synced, synced


def _target_of(temporary: str) -> str:
    """The file a temporary ``.<name>.<pid>-<random>.tiecli-tmp`` stands for."""
    m = re.fullmatch(r"\.(.+)\.(\d+)-[0-9a-f]{8}\.tiecli-tmp", temporary)
    assert m and int(m.group(2)) == os.getpid(), temporary
    return m.group(1)


def _four_shards(folder: Path) -> Path:
    """Four safetensors shards, the last holding lm_head, a stored copy of the embedding."""
    import json

    import torch
    from safetensors.torch import save_file

    folder.mkdir()
    g = torch.Generator().manual_seed(3)
    embed = torch.randn(64, 32, generator=g)
    shards: dict[str, dict[str, torch.Tensor]] = {
        f"model-0000{i}-of-00004.safetensors": {
            f"layers.{i}.{k}.weight": torch.randn(32, 32, generator=g) for k in ("q", "k")
        }
        for i in range(1, 5)
    }
    shards["model-00001-of-00004.safetensors"]["model.embed_tokens.weight"] = embed
    shards["model-00004-of-00004.safetensors"]["lm_head.weight"] = embed.clone()
    for name, tensors in shards.items():
        save_file(tensors, folder / name)
    weight_map = {n: f for f, ts in shards.items() for n in ts}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_shards_are_written_two_at_a_time_and_a_failure_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One shard's verification tail overlaps the next shard's copy; a shard that fails
    verification still fails the run, with nothing left behind."""
    import threading
    import time

    from tiecli.formats import safetensors_write

    src = _four_shards(tmp_path / "in")
    before = snapshot(src)
    lock, active, most = threading.Lock(), [0], [0]
    real_write = safetensors_write.write_file

    def slow_write(*args, **kwargs):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            time.sleep(0.2)
            return real_write(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(safetensors_write, "write_file", slow_write)
    r = tiecli.dedupe(src, tmp_path / "out")
    assert [t.alias for t in r.removed] == ["lm_head.weight"]
    assert most[0] == 2
    assert tiecli.verify(tmp_path / "out").ok

    real_equal = safetensors_write.written_equal
    monkeypatch.setattr(
        safetensors_write,
        "written_equal",
        lambda got, check, *a: (
            check if got.name == "layers.3.q.weight" else real_equal(got, check, *a)
        ),
    )
    with pytest.raises(tiecli.TiecliError, match="verification failed") as e:
        tiecli.dedupe(src, tmp_path / "again")
    assert e.value.exit_code == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]
    assert snapshot(src) == before


def test_a_large_range_shifted_within_the_page_is_copied_through_a_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel copy serves ranges that keep their offset within the page; a large
    shifted one goes through a small buffer, and arrives the same."""
    from tiecli.io import writes
    from tiecli.progress import NO_PROGRESS

    data = os.urandom(3 << 20)
    (tmp_path / "src").write_bytes(data)
    kernel: list[int] = []
    real = os.copy_file_range

    def counted(src, dst, count, src_off=None, dst_off=None):  # type: ignore[no-untyped-def]
        kernel.append(count)
        return real(src, dst, count, src_off, dst_off)

    monkeypatch.setattr(os, "copy_file_range", counted)
    for name, dst_off, by_kernel in (("shifted", 100, False), ("aligned", 4096, True)):
        reached: list[int] = []
        kernel.clear()
        src = os.open(tmp_path / "src", os.O_RDONLY)
        dst = os.open(tmp_path / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            writes.copy_range(src, dst, 0, dst_off, len(data), NO_PROGRESS, reached.append)
        finally:
            os.close(src)
            os.close(dst)
        assert (tmp_path / name).read_bytes()[dst_off:] == data
        assert bool(kernel) is by_kernel, (name, kernel)
        assert reached[-1] == dst_off + len(data) and reached == sorted(reached)


def test_a_shifted_range_that_arrives_different_is_never_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The buffered copy of a shifted range is verified like the kernel's: a byte that
    arrives different fails the rewrite and leaves nothing."""
    import torch
    from safetensors.torch import save_file

    from tiecli.io import writes

    g = torch.Generator().manual_seed(3)
    embed = torch.randn(1000, 1001, generator=g)  # 4,004,000 bytes: shifts what follows
    sd = {
        "a.weight": torch.randn(512, 1024, generator=g),
        "lm_head.weight": embed.clone(),
        "model.embed_tokens.weight": embed,
        "z.weight": torch.randn(1024, 1024, generator=g),
    }
    src = tmp_path / "in.safetensors"
    save_file(sd, str(src))
    real = writes.write_all
    flipped: list[int] = []

    def bad_write(fd: int, data: bytes | memoryview, offset: int) -> int:
        if len(data) >= 4096:  # a piece of tensor bytes, not the header
            data = bytes(data)
            data = bytes([data[0] ^ 0xFF]) + data[1:]
            flipped.append(offset)
        return real(fd, data, offset)

    monkeypatch.setattr(writes, "write_all", bad_write)
    before = snapshot(tmp_path)
    with pytest.raises(tiecli.TiecliError, match="verification failed") as e:
        tiecli.dedupe(src, tmp_path / "out.safetensors")
    assert e.value.exit_code == 1
    assert flipped, "no range was copied through the buffer"
    assert snapshot(tmp_path) == before
