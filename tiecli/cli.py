"""The ``tiecli`` command line: parse flags, call one library function, render.

Errors from the library are turned into one ``Error: ...`` line and an exit
code here, in :class:`_Group`, the single place that does it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from . import __version__
from .errors import TiecliError


class _Group(TyperGroup):
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except TiecliError as e:
            if _debug():
                raise
            typer.echo(f"Error: {e.one_line()}", err=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("Error: interrupted", err=True)
            raise typer.Exit(130) from None


def _debug() -> bool:
    return os.environ.get("TIECLI_DEBUG", "") not in ("", "0") or "--debug" in sys.argv


app = typer.Typer(
    cls=_Group,
    name="tiecli",
    help="Find, record, dedupe, restore and verify tied weights in PyTorch checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

PathArg = Annotated[Path, typer.Argument(help="A .safetensors file, a sharded index or its folder, a .bin/.pt/.pth/.ckpt, or a Hugging Face folder.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="No progress output.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tiecli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    """Find, record, dedupe, restore and verify tied weights in PyTorch checkpoints."""


def _stdout() -> Console:
    return Console(soft_wrap=False)


@app.command()
def inspect(path: PathArg, json_out: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """List tensors, ties (kind, evidence, transform, bytes) and problems. Always exits 0."""
    from .api import inspect as run
    from .progress import console_progress
    from .render import print_json, render_inspect

    result = run(path, progress=console_progress(quiet))
    if json_out:
        print_json(result)
    else:
        render_inspect(result, _stdout())


def main() -> None:
    """Console entry point."""
    app()
