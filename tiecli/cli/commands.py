"""The commands of the ``tiecli`` command line: parse flags, call one library
function, render.

Errors from the library are turned into one ``Error: ...`` line and an exit
code here, in :class:`_Group`, the single place that does it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from .. import __version__
from ..errors import TiecliError, as_flag, debugging
from ..flags import (
    ConfigOpt,
    DryRunOpt,
    ForceOpt,
    FsyncOpt,
    JsonOpt,
    MaxDownloadOpt,
    OutOpt,
    PathArg,
    QuietOpt,
    RemotePathArg,
    TimeoutOpt,
)
from ..terminal import printable
from . import collecting


class _Group(TyperGroup):
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except TiecliError as e:
            if debugging():
                raise
            typer.echo(f"Error: {printable(e.one_line(as_flag))}", err=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("Error: interrupted", err=True)
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=_Group,
    name="tiecli",
    help="Find, record, dedupe, restore and verify tied weights in PyTorch checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tiecli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    """Find, record, dedupe, restore and verify tied weights in PyTorch checkpoints."""


def _emit(result: Any, json_out: bool, render: str) -> None:
    """One JSON document, or the human rendering (``render``, a function of
    :mod:`tiecli.render`, which alone imports rich), on stdout; warnings on stderr."""
    for skipped in getattr(result, "not_copied", []):
        line = f"{skipped['path']}: not copied to the output: {skipped['reason']}"
        typer.echo(f"Warning: {printable(line)}", err=True)

    if json_out:
        from ..json_out import print_json

        print_json(result)
    else:
        from rich.console import Console

        from .. import render as rendering

        console = Console(soft_wrap=False, emoji=False)  # ":warning:" in a name stays text
        getattr(rendering, render)(result, console)


def _remote_json(json_out: bool, *paths: object) -> bool:
    """Whether ``--json`` silences the progress bar: it does for a URL, whose reads the
    JSON's ``remote`` object reports (a local run keeps its bar on stderr)."""
    return json_out and any(isinstance(p, str) and "://" in p for p in paths)


@app.command()
def inspect(
    path: RemotePathArg,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    max_download: MaxDownloadOpt = None,
    timeout: TimeoutOpt = None,
    config: ConfigOpt = None,
) -> None:
    """List tensors, ties (kind, evidence, transform, bytes) and problems. Always exits 0."""
    from ..api import inspect as run
    from ..progress import console_progress

    with collecting():
        result = run(
            path,
            progress=console_progress(quiet or _remote_json(json_out, path)),
            max_download=max_download,
            timeout=timeout,
            config=config,
        )
    _emit(result, json_out, "render_inspect")


@app.command()
def dedupe(
    path: PathArg,
    output: OutOpt = None,
    by_value: Annotated[
        bool,
        typer.Option("--by-value", help="Also remove duplicates nobody declared (equal by value)."),
    ] = False,
    min_bytes: Annotated[
        int,
        typer.Option("--min-bytes", min=0, help="With --by-value: smallest duplicate to remove."),
    ] = 1 << 20,
    dry_run: DryRunOpt = False,
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            help="Convert on the way: 'safetensors' (from a PyTorch pickle, or a torch "
            "distributed checkpoint folder to a Hugging Face folder with -o).",
            show_default=False,
        ),
    ] = None,
    force: ForceOpt = False,
    fsync: FsyncOpt = False,
    timeout: TimeoutOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
    max_shard_size: Annotated[
        str | None,
        typer.Option(
            "--max-shard-size",
            help="Torch distributed checkpoints: the largest safetensors shard written, "
            "e.g. 5GB or 2GiB [default: 50GB, as transformers' save_pretrained].",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Rewrite with one stored copy per tie plus a tie record. In place without -o."""
    from ..api import dedupe as run
    from ..progress import console_progress

    with collecting():
        result = run(
            path,
            output,
            by_value=by_value,
            min_bytes=min_bytes,
            dry_run=dry_run,
            to=to,
            force=force,
            fsync=fsync,
            progress=console_progress(quiet or _remote_json(json_out, path)),
            timeout=timeout,
            config=config,
            max_shard_size=max_shard_size,
        )
    _emit(result, json_out, "render_dedupe")


@app.command()
def untie(
    path: PathArg,
    output: OutOpt = None,
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
    fsync: FsyncOpt = False,
    timeout: TimeoutOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Store every alias as its own tensor, for consumers that know nothing of ties."""
    from ..api import untie as run
    from ..progress import console_progress

    with collecting():
        result = run(
            path,
            output,
            dry_run=dry_run,
            force=force,
            fsync=fsync,
            progress=console_progress(quiet or _remote_json(json_out, path)),
            timeout=timeout,
        )
    _emit(result, json_out, "render_untie")


@app.command()
def fix(
    path: PathArg,
    output: OutOpt = None,
    dry_run: DryRunOpt = False,
    tie: Annotated[
        bool,
        typer.Option(
            "--tie",
            help="Where the config unties a head that is absent: make it say tied, so every "
            "consumer uses the embedding as the head.",
        ),
    ] = False,
    untie_head: Annotated[
        bool,
        typer.Option(
            "--untie-head",
            help="Where the head is absent: store a copy of the embedding as the head and "
            "make the config say untied.",
        ),
    ] = False,
    trim_padding: Annotated[
        bool,
        typer.Option(
            "--trim-padding",
            help="Cut a padded embedding (more rows than the head, the first ones equal) to "
            "the config's vocab_size.",
        ),
    ] = False,
    force: ForceOpt = False,
    fsync: FsyncOpt = False,
    timeout: TimeoutOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Rewrite so that every consumer (transformers 4/5, vLLM, MLX-LM, llama.cpp) loads the same model."""
    from ..api import fix as run
    from ..progress import console_progress

    with collecting():
        result = run(
            path,
            output,
            dry_run=dry_run,
            tie=tie,
            untie_head=untie_head,
            trim_padding=trim_padding,
            force=force,
            fsync=fsync,
            progress=console_progress(quiet or _remote_json(json_out, path)),
            timeout=timeout,
        )
    _emit(result, json_out, "render_fix")


@app.command()
def verify(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="Checkpoints to check (local, or remote URLs as for inspect); the files of one "
            "sharded checkpoint are checked once.",
            show_default=False,
        ),
    ],
    require_deduped: Annotated[
        bool,
        typer.Option(
            "--require-deduped", help="Also fail when a tied tensor is stored more than once."
        ),
    ] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on warnings too.")] = False,
    forward: Annotated[
        bool,
        typer.Option(
            "--forward",
            help="Rebuild the model, load it with ties restored and run a seeded forward pass.",
        ),
    ] = False,
    device: Annotated[
        str,
        typer.Option(
            "--device", help="With --forward: auto (cuda when available), cpu, cuda or cuda:N."
        ),
    ] = "auto",
    against: Annotated[
        Path | None,
        typer.Option(
            "--against",
            help="With --forward: a reference checkpoint whose outputs must be bit-identical.",
            show_default=False,
        ),
    ] = None,
    atol: Annotated[
        float | None,
        typer.Option(
            "--atol",
            min=0,
            help="With --against: accept outputs within this max abs difference.",
            show_default=False,
        ),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            help="With --forward: cast floating weights (float32, float16, bfloat16, float64).",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="With --forward: module:function returning the nn.Module (instead of config.json).",
            show_default=False,
        ),
    ] = None,
    device_map: Annotated[
        str | None,
        typer.Option(
            "--device-map",
            help="With --forward: place the model across GPUs, CPU and disk with accelerate: "
            'auto, balanced, balanced_low_0, sequential, or JSON {"module": 0 | "cpu" | "disk"}.',
            show_default=False,
        ),
    ] = None,
    max_memory: Annotated[
        str | None,
        typer.Option(
            "--max-memory",
            help="With --device-map: memory per device, e.g. 0=60GiB,1=60GiB,cpu=100GiB,disk=1TB.",
            show_default=False,
        ),
    ] = None,
    for_consumers: Annotated[
        str | None,
        typer.Option(
            "--for",
            help="Check only what these consumers load: a comma-separated list of "
            "transformers, transformers-4, transformers-5, vllm, mlx-lm, llama.cpp, each "
            "optionally with versions (transformers<5). Default: all of them.",
            show_default=False,
        ),
    ] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    max_download: MaxDownloadOpt = None,
    timeout: TimeoutOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Exit 0 when every checkpoint's ties are consistent, 1 with every problem listed when not."""
    from ..api import verify as run
    from ..progress import console_progress

    with collecting():
        result = run(
            paths,
            require_deduped=require_deduped,
            strict=strict,
            forward=forward,
            device=device,
            against=against,
            atol=atol,
            dtype=dtype,
            model=model,
            device_map=device_map,
            max_memory=max_memory,
            for_consumers=for_consumers,
            progress=console_progress(quiet or _remote_json(json_out, *paths)),
            max_download=max_download,
            timeout=timeout,
            config=config,
        )
    _emit(result, json_out, "render_verify")
    if not result.ok:
        raise typer.Exit(1)


def for_words(argv: list[str]) -> typer.Typer:
    """The app to run for ``argv``: where its first word names a command, a copy of
    :data:`app` holding that command alone, since typer turns every command's signature
    into options before it parses (some 8 ms for all five, 2 ms for one). Anything else
    (nothing, an option first, a word that is no command) runs the whole app, so its
    help and its "No such command" stay as they are."""
    chosen = [c for c in app.registered_commands if argv[:1] == [_command_name(c)]]
    if len(chosen) != 1:
        return app
    import copy

    lean = copy.copy(app)
    lean.registered_commands = chosen
    return lean


def _command_name(info: Any) -> str:
    """A registered command's name, derived by typer's own rule where none is given."""
    return str(info.name or typer.main.get_command_name(info.callback.__name__))
