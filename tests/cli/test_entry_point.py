"""The console entry point builds only the command it is asked for
(``tiecli.cli._for_words``); what the user sees is the same as from the whole app."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tiecli.cli import _command_name, _for_words, app

COMMANDS = [_command_name(c) for c in app.registered_commands]


def test_every_command_is_known_by_its_name() -> None:
    assert sorted(COMMANDS) == ["dedupe", "fix", "inspect", "untie", "verify"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("words", [["--help"], ["--no-such-flag"], []])
def test_one_command_reads_as_the_whole_app(command: str, words: list[str]) -> None:
    lean = _for_words([command, *words])
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
    assert _for_words(argv) is app


def test_the_app_itself_keeps_every_command() -> None:
    _for_words(["verify", "x"])
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
