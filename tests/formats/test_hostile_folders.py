"""Hostile folders: nothing outside the checkpoint is read or copied, nothing from a
file reaches the terminal raw (SECURITY.md, "Files outside the checkpoint").

Every test builds its hostile folder itself in ``tmp_path``: links out of the folder
(to a "secret" beside it), link loops, fifos, and tensor, shard and file names that
carry terminal escape sequences and rich markup.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from tiecli import progress as progress_module
from tiecli.cli import app

runner = CliRunner()

SECRET = "TOPSECRET-5c1d"  # what must never leave its file
SECRET_NUMBER = 7351986420135792468  # a secret file's first 8 bytes, read as a header length
SMALL_SECRET_NUMBER = 73519  # within the header limit, past the end of the file
# Names that set the window title, clear the screen, move the cursor (C0 and C1 forms),
# ring the bell, and restyle the line through rich markup.
HOSTILE = [
    "emb\x1b]0;pwned\x07.weight",
    "head\x1b[2J\x1b[H[bold red]RED[/bold red].weight",
    "x\x9b31m\x7f[link=file:///etc]y[/link].weight",
]
ESCAPES = ("\x1b", "\x9b", "\x07", "\x7f")


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIECLI_DEBUG", raising=False)


def tensors(names: list[str]) -> dict[str, np.ndarray]:
    """Equal 3×4 tensors under ``names`` (so they pair up as ties), and a norm."""
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    return {n: w.copy() for n in names} | {"norm.weight": np.ones(4, np.float32)}


def model_folder(root: Path) -> Path:
    """A small checkpoint folder with a tokenizer beside it, and a secret beside the folder."""
    m = root / "model"
    m.mkdir()
    save_file(tensors(["a.weight", "b.weight"]), str(m / "model.safetensors"))
    (m / "tokenizer.json").write_text('{"vocab": {}}')
    secret = root / "home" / ".ssh"
    secret.mkdir(parents=True)
    (secret / "id_ed25519").write_text(SECRET)
    (root / "home" / "notes.txt").write_text(SECRET)
    return m


def tree(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: 'dir', 'link -> target' or the file's text."""
    out = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink():
                out[rel] = f"link -> {os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = p.read_bytes().decode("latin-1")
    return out


def dedupe_to(m: Path, out: Path) -> tuple[object, dict]:
    r = runner.invoke(app, ["dedupe", str(m), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    return r, json.loads(r.stdout)


# ------------------------------------------------------------- copying (-o)
def test_directory_link_out_of_the_folder_is_not_copied(tmp_path: Path) -> None:
    m = model_folder(tmp_path)
    (m / "assets").symlink_to(tmp_path / "home" / ".ssh")  # assets -> ~/.ssh
    (m / "sub").mkdir()
    (m / "sub" / "key").symlink_to(tmp_path / "home" / ".ssh" / "id_ed25519")  # absolute
    r, doc = dedupe_to(m, tmp_path / "out")
    copied = tree(tmp_path / "out")
    assert "assets" not in copied and "sub/key" not in copied
    assert all(SECRET not in v for v in copied.values())
    assert copied["tokenizer.json"] == '{"vocab": {}}' and copied["sub"] == "dir"
    assert {d["path"] for d in doc["not_copied"]} == {str(m / "assets"), str(m / "sub" / "key")}
    assert all("outside the checkpoint folder" in d["reason"] for d in doc["not_copied"])
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("Warning: ")]
    assert len(warnings) == 2 and str(m / "assets") in warnings[0]


def test_link_to_the_parent_is_not_followed(tmp_path: Path) -> None:
    m = model_folder(tmp_path)
    (m / "up").symlink_to("..")  # the folder's parent: the model again, and the secrets
    (m / "self").symlink_to(".")  # a loop inside the folder: copied as the link it is
    r, doc = dedupe_to(m, tmp_path / "out")
    copied = tree(tmp_path / "out")
    assert "up" not in copied and all(SECRET not in v for v in copied.values())
    assert copied["self"] == "link -> ."
    assert [d["path"] for d in doc["not_copied"]] == [str(m / "up")]


def test_links_inside_the_folder_stay_links_and_broken_ones_are_left_out(tmp_path: Path) -> None:
    m = model_folder(tmp_path)
    (m / "sub").mkdir()
    (m / "tok.json").symlink_to("tokenizer.json")
    (m / "sub" / "tok.json").symlink_to(m / "tokenizer.json")  # absolute, but inside
    (m / "latest").symlink_to("sub")
    (m / "dangling").symlink_to("nowhere")
    (m / "loop").symlink_to("loop")
    r, doc = dedupe_to(m, tmp_path / "out")
    copied = tree(tmp_path / "out")
    assert copied["tok.json"] == "link -> tokenizer.json"
    assert copied["sub/tok.json"] == "link -> ../tokenizer.json"  # relative: no way back
    assert copied["latest"] == "link -> sub"
    assert "dangling" not in copied and "loop" not in copied
    reasons = {Path(d["path"]).name: d["reason"] for d in doc["not_copied"]}
    assert set(reasons) == {"dangling", "loop"} and "points nowhere" in reasons["loop"]


def test_fifo_is_never_opened(tmp_path: Path) -> None:
    m = model_folder(tmp_path)
    os.mkfifo(m / "pipe")  # opening it for reading would wait for a writer forever
    (m / "pipe-link").symlink_to("pipe")
    r, doc = dedupe_to(m, tmp_path / "out")
    copied = tree(tmp_path / "out")
    assert "pipe" not in copied and "pipe-link" not in copied
    assert {Path(d["path"]).name for d in doc["not_copied"]} == {"pipe", "pipe-link"}
    assert "fifo" in doc["not_copied"][0]["reason"]


def test_hugging_face_cache_snapshot_is_read_and_copied(tmp_path: Path) -> None:
    """A cache snapshot's files are links into the repository's blobs: its own files."""
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    save_file(tensors(["a.weight", "b.weight"]), str(repo / "blobs" / "aa11"))
    (repo / "blobs" / "bb22").write_text('{"vocab": {}}')
    (snap / "model.safetensors").symlink_to("../../blobs/aa11")
    (snap / "tokenizer.json").symlink_to("../../blobs/bb22")
    (snap / "escape.txt").symlink_to("../../../../home/notes.txt")
    model_folder(tmp_path)  # the secret at tmp_path/home
    r = runner.invoke(app, ["inspect", str(snap), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["tensors"] == 3
    r, doc = dedupe_to(snap, tmp_path / "out")
    copied = tree(tmp_path / "out")
    assert copied["tokenizer.json"] == '{"vocab": {}}'  # the blob's bytes, as a file
    assert "escape.txt" not in copied and [Path(d["path"]).name for d in doc["not_copied"]] == [
        "escape.txt"
    ]


# ----------------------------------------------- reading through links (no leak)
def secret_file(path: Path, number: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", number) + SECRET.encode())
    return path


def assert_no_leak(r, *numbers: int) -> None:
    text = r.output
    for n in numbers:
        assert str(n) not in text and hex(n)[2:] not in text, text
    assert SECRET not in text


def sharded(folder: Path, shard_names: list[str]) -> Path:
    """A checkpoint whose tensors are spread one per shard over ``shard_names``."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ["a.weight", "b.weight", "norm.weight"]
    weight_map = {}
    all_t = tensors(names[:2])
    for i, shard in enumerate(shard_names):
        name = names[i % len(names)]
        save_file({name: all_t[name]}, str(folder / shard))
        weight_map[name] = shard
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("command", ["inspect", "verify", "dedupe", "untie"])
def test_shard_linked_out_of_the_folder_is_not_read(tmp_path: Path, command: str) -> None:
    m = sharded(tmp_path / "model", ["s1.safetensors", "s2.safetensors", "s3.safetensors"])
    secret = secret_file(tmp_path / "home" / "token", SECRET_NUMBER)
    (m / "s2.safetensors").unlink()
    (m / "s2.safetensors").symlink_to(secret)
    for target in (m, m / "model.safetensors.index.json"):
        r = runner.invoke(app, [command, str(target)])
        assert r.exit_code == 2, r.output
        assert "outside the checkpoint folder" in r.stderr
        assert "s2.safetensors" in r.stderr
        assert_no_leak(r, SECRET_NUMBER)


def test_weights_and_config_linked_out_of_the_folder_are_not_read(tmp_path: Path) -> None:
    m = tmp_path / "model"
    m.mkdir()
    (m / "model.safetensors").symlink_to(secret_file(tmp_path / "home" / "a", SECRET_NUMBER))
    r = runner.invoke(app, ["inspect", str(m)])
    assert r.exit_code == 2 and "outside the checkpoint folder" in r.stderr
    assert_no_leak(r, SECRET_NUMBER)
    (m / "model.safetensors").unlink()
    save_file(tensors(["a.weight"]), str(m / "model.safetensors"))
    (m / "config.json").symlink_to(tmp_path / "home" / "a")
    r = runner.invoke(app, ["inspect", str(m), "--json"])
    assert r.exit_code == 2 and "config.json" in r.stderr and "outside" in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("number", [SECRET_NUMBER, SMALL_SECRET_NUMBER])
def test_a_named_file_is_followed_but_its_bytes_never_printed(tmp_path: Path, number: int) -> None:
    """A link the user names is the user's choice: read, and no number from it printed."""
    secret = secret_file(tmp_path / "home" / "token", number)
    link = tmp_path / "named.safetensors"
    link.symlink_to(secret)
    for args in (["inspect", str(link)], ["verify", str(link)], ["inspect", str(secret)]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and "header length" in r.stderr
        assert f"({secret.stat().st_size}-byte file" in r.stderr or "limit" in r.stderr
        assert_no_leak(r, number)


def test_header_field_values_are_not_quoted(tmp_path: Path) -> None:
    """Shapes, offsets and odd dtype values from a header never appear in a message."""
    for field, value in [
        ("dtype", SECRET),
        ("shape", [SMALL_SECRET_NUMBER, -1]),
        ("data_offsets", [0, SMALL_SECRET_NUMBER]),
    ]:
        entry = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], field: value}
        raw = json.dumps({"t": entry}).encode()
        f = tmp_path / f"{field}.safetensors"
        f.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
        r = runner.invoke(app, ["inspect", str(f)])
        assert r.exit_code == 2 and "tensor 't'" in r.stderr, r.output
        assert_no_leak(r, SMALL_SECRET_NUMBER)


# ------------------------------------------------------------ terminal output
SGR = re.compile(r"\x1b\[[0-9;]*m")  # rich's own colours, when forced on


def hostile_file(tmp_path: Path) -> Path:
    f = tmp_path / "model.safetensors"
    save_file(tensors(HOSTILE), str(f))
    return f


def assert_spelled_out(text: str) -> None:
    assert not any(c in text for c in ESCAPES), repr(text)
    assert "[bold red]RED[/bold red]" in text and "[link=file:///etc]" in text
    assert "\\x1b]0;pwned\\x07" in text and "\\u009b31m\\x7f" in text


@pytest.mark.parametrize("color", [False, True], ids=["plain", "color"])
@pytest.mark.parametrize(
    "args",
    [["inspect"], ["dedupe", "--dry-run", "--by-value", "--min-bytes", "0"]],
    ids=["inspect", "dedupe"],
)
def test_names_reach_tables_spelled_out(tmp_path: Path, args: list[str], color: bool) -> None:
    f = hostile_file(tmp_path)
    env = {"COLUMNS": "250"} | ({"FORCE_COLOR": "1"} if color else {"NO_COLOR": "1"})
    r = runner.invoke(app, [*args, str(f)], env=env)
    assert r.exit_code == 0, r.output
    assert_spelled_out(SGR.sub("", r.stdout) if color else r.stdout)
    r = runner.invoke(app, [*args, str(f), "--json"], env=env)  # exact, and spelled \u001b
    assert r.exit_code == 0 and not any(c in r.stdout for c in ESCAPES)
    doc = json.loads(r.stdout)
    ties = doc["ties"] if "ties" in doc else doc["removed_ties"]
    assert {n for t in ties for n in (t["alias"], t["source"])} == set(HOSTILE)


def test_drift_message_in_problems_table_is_spelled_out(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    t = tensors(HOSTILE[:2])
    t[HOSTILE[1]][0, 0] = 99.0  # drifts from the source its record names
    save_file(t, str(f), metadata={HOSTILE[1]: HOSTILE[0]})
    r = runner.invoke(app, ["verify", str(f)], env={"COLUMNS": "250", "FORCE_COLOR": "1"})
    text = SGR.sub("", r.stdout)
    assert r.exit_code == 1 and "drift" in text
    assert not any(c in text for c in ESCAPES), text
    assert "[bold red]RED[/bold red]" in text and "\\x1b[2J" in text


def test_error_and_warning_lines_are_spelled_out(tmp_path: Path) -> None:
    bad = tmp_path / "m\x1b]0;title\x07[bold]x"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\x01" * 4)
    r = runner.invoke(app, ["inspect", str(bad)])
    assert r.exit_code == 2 and r.stderr.startswith("Error: ")
    assert not any(c in r.stderr for c in ESCAPES) and "\\x1b]0;title\\x07[bold]x" in r.stderr
    m = model_folder(tmp_path)
    (m / "gone\x1b[2J\x9b").symlink_to("nowhere")
    r = runner.invoke(app, ["dedupe", str(m), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0 and "Warning: " in r.stderr
    assert not any(c in r.stderr for c in ESCAPES) and "gone\\x1b[2J\\u009b" in r.stderr


def test_shard_names_in_progress_bars_are_spelled_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress_module._RichProgress, "DELAY", 0.0)  # show every bar
    shard = "s\x1b]0;pwned\x07[bold red]RED[blink]\x9b2J.safetensors"  # no "/" in a name
    m = sharded(tmp_path / "model", [shard, "plain.safetensors"])
    env = {"TTY_COMPATIBLE": "1", "COLUMNS": "200", "NO_COLOR": "1"}
    r = runner.invoke(app, ["untie", str(m), "-o", str(tmp_path / "out")], env=env)
    assert r.exit_code == 0, r.output
    assert "writing " in r.stderr  # the bar was drawn
    assert "[bold red]RED[blink]\\u009b2J" in r.stderr and "\\x1b]0;pwned\\x07" in r.stderr
    assert "\x1b]" not in r.stderr and "\x9b" not in r.stderr and "\x07" not in r.stderr


def test_folders_nested_deeper_than_the_recursion_limit_are_copied(tmp_path: Path) -> None:
    import shutil
    import sys

    from helpers import fixture_path

    x = shutil.copytree(fixture_path("gpt2", "hf"), tmp_path / "x")
    depth = 400  # deeper than the limit below: a recursive walk cannot copy it
    deep = x
    for _ in range(depth):
        deep = deep / "a"
        deep.mkdir()
    (deep / "leaf.txt").write_text("bottom")
    out = tmp_path / "out"
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(300)
    try:
        r = runner.invoke(app, ["dedupe", str(x), "-o", str(out), "--json"])
    finally:
        sys.setrecursionlimit(limit)
    assert r.exit_code == 0, r.output
    assert out.joinpath(*["a"] * depth, "leaf.txt").read_text() == "bottom"


def test_emoji_codes_and_bidi_marks_in_names_stay_visible_text(tmp_path: Path) -> None:
    from tiecli.terminal import printable

    names = ["ok:warning:.weight", "ok:cross_mark:\u200f\u061c.weight"]
    f = tmp_path / "model.safetensors"
    t = tensors(names[:1])
    t[names[1]] = t[names[0]].copy()
    save_file(t, str(f))
    r = runner.invoke(app, ["inspect", str(f)], env={"COLUMNS": "250", "NO_COLOR": "1"})
    assert r.exit_code == 0, r.output
    assert ":warning:" in r.stdout and ":cross_mark:" in r.stdout
    assert "\u26a0" not in r.stdout and "\u274c" not in r.stdout  # no emoji posing as a status
    assert "\\u200f\\u061c" in r.stdout and "\u200f" not in r.stdout
    assert printable("a\u200eb") == "a\\u200eb"
