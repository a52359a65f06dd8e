"""The console entry point builds only the command it is asked for
(``tiecli.cli.commands.for_words``); what the user sees is the same as from the whole app."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tiecli.cli.commands import _command_name, app, for_words

COMMANDS = [_command_name(c) for c in app.registered_commands]


def test_every_command_is_known_by_its_name() -> None:
    assert sorted(COMMANDS) == ["dedupe", "fix", "inspect", "untie", "verify"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("words", [["--help"], ["--no-such-flag"], []])
def test_one_command_reads_as_the_whole_app(command: str, words: list[str]) -> None:
    lean = for_words([command, *words])
    assert lean is not app
    built = typer.main.get_command(lean)
    assert list(getattr(built, "commands", {})) == [command]
    runner = CliRunner()
    whole = runner.invoke(app, [command, *words], terminal_width=100)
    alone = runner.invoke(lean, [command, *words], terminal_width=100)
    assert (alone.exit_code, alone.output) == (whole.exit_code, whole.output)
    assert whole.exit_code != 1  # help (0) or a usage error (2)


@pytest.mark.parametrize(
    "argv", [[], ["--help"], ["--version"], ["--debug", "verify", "x"], ["nope"], ["Verify"]]
)
def test_anything_but_a_command_first_runs_the_whole_app(argv: list[str]) -> None:
    assert for_words(argv) is app


def test_the_app_itself_keeps_every_command() -> None:
    for_words(["verify", "x"])
    assert sorted(_command_name(c) for c in app.registered_commands) == sorted(COMMANDS)


def test_the_console_entry_point_runs_the_command(tmp_path: Path) -> None:
    code = "import sys; from tiecli.cli import main; sys.argv = ['tiecli', *sys.argv[1:]]; main()"
    missing = tmp_path / "missing.safetensors"
    out = subprocess.run(
        [sys.executable, "-c", code, "verify", str(missing)], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert out.stderr.startswith("Error: ") and "missing.safetensors" in out.stderr
    typo = subprocess.run([sys.executable, "-c", code, "verfy"], capture_output=True, text=True)
    assert typo.returncode == 2 and "No such command 'verfy'" in typo.stderr


COLLECTOR = """
import atexit, gc, json, sys
import tiecli.api, tiecli.render
from tiecli.api.rewrites import dedupe as real_dedupe

atexit.register(lambda: None)  # an exit handler: main returns instead of ending the process
seen = {}

def state():
    return {"on": gc.isenabled(), "frozen": gc.get_freeze_count() > 0}

def dedupe(*args, **kwargs):
    seen["work"] = state()
    return real_dedupe(*args, **kwargs)

real_render = tiecli.render.render_dedupe

def render_dedupe(*args, **kwargs):
    seen["render"] = state()
    return real_render(*args, **kwargs)

tiecli.api.dedupe, tiecli.render.render_dedupe = dedupe, render_dedupe
early = []  # collections before the work begins
gc.callbacks.append(lambda phase, info: phase == "start" and "work" not in seen and early.append(1))
sys.argv = ["tiecli", *sys.argv[1:]]
if sys.argv[-1] == "--runner":
    from typer.testing import CliRunner
    from tiecli.cli import app
    result = CliRunner().invoke(app, sys.argv[1:-1])
    code = result.exit_code
else:
    from tiecli.cli import main
    try:
        main()
    except SystemExit as e:
        code = e.code
seen["after"] = state()
seen["code"] = code
seen["early"] = len(early)
print(json.dumps(seen))
"""


@pytest.mark.parametrize("how", ["main", "runner"])
def test_the_console_entry_pauses_the_collector_around_the_work(tmp_path: Path, how: str) -> None:
    """Start-up and rendering without the cycle collector, the work with it (and what
    start-up built frozen); the process's collector as it was once main returns. The
    app run through CliRunner leaves the collector alone."""
    fixture = Path(__file__).parents[2] / "fixtures/llama-tied/full/model.safetensors"
    argv = ["dedupe", str(fixture), "-o", str(tmp_path / "out.safetensors"), "-q"]
    out = subprocess.run(
        [sys.executable, "-c", COLLECTOR, *argv, *(["--runner"] if how == "runner" else [])],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.splitlines()[-1])
    assert seen["code"] == 0
    collector_on = {"on": True, "frozen": False}
    if how == "main":
        assert seen["work"] == {"on": True, "frozen": True}
        assert seen["render"] == {"on": False, "frozen": True}
        assert seen["early"] == 0  # typer, the commands and their parsing: none
    else:
        assert seen["work"] == seen["render"] == collector_on
        assert seen["early"] > 0  # importing the commands alone collects
    assert seen["after"] == collector_on
    assert (tmp_path / "out.safetensors").exists()
