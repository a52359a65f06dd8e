"""Concurrent and partial runs never lose data.

Two runs on one checkpoint or one output: the second is refused while the first
holds the lock, and the first finishes with a verified result. Temporaries carry
their writer's pid, and a run removes only those whose writer is gone. A shard
is never rewritten alone. ``-o --force`` replaces an output so that, killed at
any instant, the output or its old version exists, and the next run keeps it.
Index rewrites keep every key; in-place rewrites keep the file's owner.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import FIXTURES, MANIFEST, sharded_pickle
from safetensors.torch import load_file
from typer.testing import CliRunner

import tiecli
from tiecli.cli import app

runner = CliRunner()


def tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def unlocked(files: dict[str, str]) -> dict[str, str]:
    return {n: h for n, h in files.items() if not n.endswith(".tiecli.lock")}


def error_line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


# -- two runs at once ------------------------------------------------------------

HELD_RUN = """
import os, sys, time
import tiecli.io.writes as writes

go = sys.argv.pop(1)
real_copy, real_write = writes.copy_range, writes.write_all

def wait():  # the writer stops until the test lets it go on
    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)

def held_copy(*a, **k):
    wait()
    return real_copy(*a, **k)

def held_write(*a, **k):
    wait()
    return real_write(*a, **k)

writes.copy_range, writes.write_all = held_copy, held_write
from tiecli.cli import main
sys.argv = ["tiecli", *sys.argv[1:]]
main()
"""


def _held_run(go: Path, *args: str) -> subprocess.Popen:
    """A real tiecli process whose writer waits for ``go`` to exist before each write."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HELD_RUN), str(go), *args, "--json", "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_for(proc: subprocess.Popen, folder: Path, suffix: str) -> None:
    deadline = time.monotonic() + 30
    while not any(p.name.endswith(suffix) for p in folder.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the first run never started writing"
        time.sleep(0.005)


def test_second_in_place_run_is_refused_and_the_first_finishes(tmp_path: Path) -> None:
    x = shutil.copytree(FIXTURES / "t5/full-sharded", tmp_path / "x")
    original = tiecli.load(x)
    go = tmp_path / "go"
    first = _held_run(go, "dedupe", str(x))
    _wait_for(first, x, ".tiecli-tmp")
    temporaries = {p.name for p in x.iterdir() if p.name.endswith(".tiecli-tmp")}

    for target in (x, x / "model.safetensors.index.json"):
        for command in ("dedupe", "untie"):
            r = runner.invoke(app, [command, str(target), "--json"])
            assert r.exit_code == 2, r.output
            line = error_line(r)
            assert "another tiecli" in line and f"pid {first.pid}" in line, line
            assert r.stdout == ""
    # reading takes no lock
    assert runner.invoke(app, ["inspect", str(x), "--json"]).exit_code == 0
    assert runner.invoke(app, ["verify", str(x), "--json"]).exit_code == 0
    # the refused runs left the first one's temporaries alone
    assert temporaries <= {p.name for p in x.iterdir()}
    assert first.poll() is None

    go.touch()
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err.decode()
    assert sorted(json.loads(out)["removed"]) == sorted(MANIFEST["models"]["t5"]["ties"])
    assert tiecli.verify(x).ok
    loaded = tiecli.load(x)
    assert sorted(loaded) == sorted(original)
    assert all(loaded[n].equal(t) for n, t in original.items())
    assert [p.name for p in x.iterdir() if ".tiecli" in p.name] == []  # nor the lock file


def test_second_run_to_the_same_output_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    go = tmp_path / "go"
    first = _held_run(go, "dedupe", str(FIXTURES / "t5/full-sharded"), "-o", str(out))
    _wait_for(first, tmp_path, ".tiecli-tmp")
    r = runner.invoke(app, ["untie", str(FIXTURES / "t5/hf"), "-o", str(out), "--force", "--json"])
    assert r.exit_code == 2 and "another tiecli" in error_line(r), r.output
    assert first.poll() is None
    # nor is a run rewriting in place the checkpoint that the output replaces
    shutil.copytree(FIXTURES / "t5/hf", tmp_path / "other")
    tiecli.untie(tmp_path / "other", out := tmp_path / "other-out")
    second = _held_run(go, "dedupe", str(out))
    _wait_for(second, out, ".tiecli-tmp")
    r = runner.invoke(app, ["dedupe", str(tmp_path / "other"), "-o", str(out), "--force"])
    assert r.exit_code == 2 and "another tiecli" in error_line(r), r.output
    assert first.poll() is None and second.poll() is None
    go.touch()
    assert second.wait(timeout=60) == 0
    _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err.decode()
    assert tiecli.verify(out, require_deduped=True).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "other", "other-out", "out"]


def test_a_held_lock_refuses_at_once_and_a_stale_one_is_taken_over(tmp_path: Path) -> None:
    x = shutil.copytree(FIXTURES / "gpt2/full", tmp_path / "x")
    before = tree(x)
    lock = x / ".model.safetensors.tiecli.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        r = runner.invoke(app, ["dedupe", str(x / "model.safetensors")])
        assert r.exit_code == 2 and "another tiecli is rewriting" in error_line(r)
        assert tree(x) == before | {lock.name: hashlib.sha256(b"").hexdigest()}
        r = runner.invoke(app, ["dedupe", str(x), "--dry-run", "--json"])  # writes nothing
        assert r.exit_code == 0, r.output
    finally:
        os.close(fd)  # as a killed holder: the lock file stays, nobody holds it
    assert lock.exists()
    r = runner.invoke(app, ["dedupe", str(x), "-o", str(tmp_path / "out")])  # not copied
    assert r.exit_code == 0 and sorted(tree(tmp_path / "out")) == sorted(before), r.output
    r = runner.invoke(app, ["dedupe", str(x), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["removed"] == ["lm_head.weight"]
    assert not lock.exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
def test_another_users_lock_file_still_excludes() -> None:
    """In a shared folder the lock file belongs to whoever made it; another user, who may not
    open it for writing, must still be refused while it is held."""
    import tempfile

    from tiecli import atomic

    shared = Path(tempfile.mkdtemp(prefix="tiecli-shared-", dir="/tmp"))
    try:
        shared.chmod(0o1777)
        target = shared / "model.safetensors"
        target.write_bytes(b"x")
        target.chmod(0o666)
        child = textwrap.dedent(
            f"""
            import fcntl, os, sys
            from pathlib import Path
            from tiecli import atomic
            from tiecli.errors import BusyError
            os.setgid(65534); os.setuid(65534)  # everything imported while still root
            t = Path({str(target)!r})
            try:
                with atomic.locked([t], t):
                    print("acquired")
            except BusyError:
                print("busy")
            """
        )
        with atomic.locked([target], target):  # root holds it; the file is root's, 0644
            out = subprocess.run(
                [sys.executable, "-c", child],
                capture_output=True,
                text=True,
                timeout=60,
                cwd="/",
                env={**os.environ, "PYTHONPATH": str(Path(tiecli.__file__).parent.parent)},
            )
        assert out.stdout.strip() == "busy", out.stderr
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_lock_file_that_is_a_symlink_is_not_followed(tmp_path: Path) -> None:
    x = shutil.copytree(FIXTURES / "gpt2/full", tmp_path / "x")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (x / ".model.safetensors.tiecli.lock").symlink_to(victim)
    r = runner.invoke(app, ["dedupe", str(x)])
    assert r.exit_code == 2 and "symbolic link" in error_line(r)
    assert victim.read_text() == "precious"
    assert "lm_head.weight" in load_file(x / "model.safetensors")


def test_cleanup_removes_only_leftovers_whose_writer_is_gone(tmp_path: Path) -> None:
    x = shutil.copytree(FIXTURES / "gpt2/full", tmp_path / "x")
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = int(done.stdout)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = x / f".model.safetensors.{dead_pid}-0123abcd.tiecli-tmp"
        live = x / f".model.safetensors.{alive.pid}-4567cdef.tiecli-tmp"
        other = x / f".config.json.{dead_pid}-89abcdef.tiecli-tmp"  # not this run's target
        for p in (dead, live, other):
            p.write_bytes(b"half a file")
        result = tiecli.dedupe(x)
        assert result.removed and tiecli.verify(x, require_deduped=True).ok
        assert not dead.exists()
        assert live.read_bytes() == b"half a file"
        assert other.exists()
    finally:
        alive.kill()
        alive.wait()
    tiecli.untie(x)  # its writer is gone now
    assert not live.exists()


# -- a shard is part of its checkpoint ---------------------------------------------


@pytest.mark.parametrize(
    "args",
    [["dedupe"], ["untie"], ["dedupe", "--dry-run"], ["dedupe", "--to", "safetensors"]],
)
def test_a_shard_alone_is_refused_with_the_command_that_works(
    args: list[str], tmp_path: Path
) -> None:
    if "--to" in args:
        x = sharded_pickle(tmp_path / "x")
        index, shard = x / "pytorch_model.bin.index.json", x / "pytorch_model-00002-of-00002.bin"
    else:
        source = "t5/full-sharded" if args[0] == "dedupe" else "t5/hf-sharded"
        x = shutil.copytree(FIXTURES / source, tmp_path / "x")
        index = x / "model.safetensors.index.json"
        shard = x / "model-00001-of-00003.safetensors"
        if args[0] == "untie":
            shard = sorted(x.glob("*.safetensors"))[0]
    before = tree(x)
    r = runner.invoke(app, [args[0], str(shard), *args[1:], "--json"])
    assert r.exit_code == 2, r.output
    line = error_line(r)
    assert "is a shard" in line and f"tiecli {args[0]} {index}" in line, line
    assert tree(x) == before
    # written elsewhere, a shard is a file of its own: the checkpoint is not touched
    if "--dry-run" not in args:
        r = runner.invoke(app, [args[0], str(shard), *args[1:], "-o", str(tmp_path / shard.name)])
        assert r.exit_code == 0, r.output
        assert tree(x) == before
    # the command it names works, and the checkpoint still opens
    r = runner.invoke(app, [args[0], str(index), *args[1:], "--json"])
    assert r.exit_code == 0, r.output
    assert tiecli.verify(x).ok


# -- index rewrites keep every key ------------------------------------------------


@pytest.mark.parametrize("how", ["in-place", "output", "untie"])
def test_index_rewrites_keep_every_key(how: str, tmp_path: Path) -> None:
    x = shutil.copytree(FIXTURES / "t5/full-sharded", tmp_path / "x")
    index_path = x / "model.safetensors.index.json"
    doc = json.loads(index_path.read_text())
    quant = {"quant_method": "bitsandbytes", "load_in_8bit": True, "skip": ["lm_head"]}
    doc = {"quantization_config": quant, **doc, "zz_extra": [1, 2]}
    doc["metadata"] |= {"format": "pt", "producer": "a trainer"}
    index_path.write_text(json.dumps(doc))
    if how == "in-place":
        tiecli.dedupe(x)
        written = index_path
    elif how == "output":
        tiecli.dedupe(x, tmp_path / "out")
        written = tmp_path / "out" / index_path.name
    else:
        tiecli.dedupe(x)
        tiecli.untie(x)
        written = index_path
    new = json.loads(written.read_text())
    assert list(new) == ["quantization_config", "metadata", "weight_map", "zz_extra"]
    assert new["quantization_config"] == quant and new["zz_extra"] == [1, 2]
    assert new["metadata"]["format"] == "pt" and new["metadata"]["producer"] == "a trainer"
    if how != "untie":
        assert "tiecli" in new["metadata"]
    # an index whose metadata had no "format" gets none (a shard's "format" is not the index's)
    plain = tiecli.dedupe(FIXTURES / "t5/full-sharded", tmp_path / "plain")
    assert (
        "format" not in json.loads((Path(plain.output) / index_path.name).read_text())["metadata"]
    )


# -- owner kept -------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
@pytest.mark.parametrize("rel", ["gpt2/full", "t5/full-sharded"])
def test_in_place_rewrite_keeps_owner_and_mode(rel: str, tmp_path: Path) -> None:
    x = shutil.copytree(FIXTURES / rel, tmp_path / "x")
    for p in x.iterdir():
        os.chown(p, 1234, 1235)
        p.chmod(0o640)
    before = tree(x)
    assert tiecli.dedupe(x).changed
    assert tree(x) != before
    for p in x.iterdir():
        st = p.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1234, 1235, 0o640), p.name


# -- -o --force killed between its renames --------------------------------------

KILLED_REPLACE = """
import os, sys
import tiecli, tiecli.atomic as atomic

out, when = sys.argv[2], sys.argv[3]
real_replace, real_exchange = os.replace, atomic.exchange

def replace(src, dst, **kw):
    if when == "between" and str(dst) == out and ".tiecli-tmp" in str(src):
        os._exit(9)  # killed: the old output moved aside, the new one not yet in
    return real_replace(src, dst, **kw)

def exchange(a, b):
    if when == "between":
        return False  # a system without an atomic exchange
    swapped = real_exchange(a, b)
    os._exit(9)  # killed right after the swap

atomic.os.replace = replace
atomic.exchange = exchange
tiecli.dedupe(sys.argv[1], out, force=True)
"""


@pytest.mark.parametrize("when", ["between", "after-exchange"])
def test_forced_replace_killed_midway_keeps_an_output(when: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    tiecli.untie(FIXTURES / "t5/hf", out)
    old = tree(out)
    new_source = FIXTURES / "t5/full"
    p = subprocess.run(
        [sys.executable, "-c", KILLED_REPLACE, str(new_source), str(out), when],
        capture_output=True,
    )
    assert p.returncode == 9, p.stderr.decode()
    aside = [q for q in tmp_path.iterdir() if q.name.startswith(".out.")]
    if when == "between":
        assert not out.exists()
        saved = [q for q in aside if q.name.endswith(".tiecli-old")]
        # the old output, whole (with the lock the killed run held on it: empty, not held)
        assert len(saved) == 1 and unlocked(tree(saved[0])) == old
        # the next run, even one that fails, puts it back first
        r = runner.invoke(app, ["dedupe", str(new_source), "-o", str(out)])
        assert r.exit_code == 2 and "--force" in error_line(r)
        assert unlocked(tree(out)) == old
    else:  # one swap: the new output is in place, the old one waits to be removed
        assert out.is_dir() and tree(out) != old
        assert tiecli.verify(out, require_deduped=True).ok
    assert [q for q in tmp_path.iterdir() if q.name.endswith(".tiecli-old")] == []
    tiecli.dedupe(new_source, out, force=True)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["out"]
    assert unlocked(tree(out)) == tree(out)
    assert tiecli.verify(out, require_deduped=True).ok


def test_a_checkpoint_that_changed_between_lock_and_open_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that converted the folder between this run's lock and its opening (the lock
    names pytorch_model.bin, the folder now opens as model.safetensors) is not raced."""
    import tiecli.write.paths

    x = shutil.copytree(FIXTURES / "gpt2/full", tmp_path / "x")
    before = tree(x)
    monkeypatch.setattr(
        tiecli.write.paths, "lock_targets", lambda *_a, **_k: [x / "pytorch_model.bin"]
    )
    r = runner.invoke(app, ["dedupe", str(x)])
    assert r.exit_code == 2 and "changed while this run started" in error_line(r)
    assert tree(x) == before
