"""The arguments and flags several commands share, declared once (``typer`` types)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

PathArg = Annotated[
    str,
    typer.Argument(
        help="A .safetensors file, a sharded index or its folder, a .bin/.pt/.pth/.ckpt, or a "
        "Hugging Face folder; or a remote one as for inspect (downloaded first; needs -o).",
        show_default=False,
    ),
]
RemotePathArg = Annotated[
    str,
    typer.Argument(
        help="A .safetensors file, a sharded index or its folder, a .bin/.pt/.pth/.ckpt, a Hugging "
        "Face folder, or a remote one read by ranges: hf://owner/repo[@revision][/folder], "
        "https://.../model.safetensors or its index, s3://... (any fsspec URL).",
        show_default=False,
    ),
]
MaxDownloadOpt = Annotated[
    int | None,
    typer.Option(
        "--max-download",
        min=0,
        help="Remote paths: bytes of whole tensors to download to confirm ties "
        "[default: 268435456 (256 MiB)]; beyond it a tie is reported unconfirmed.",
        show_default=False,
    ),
]
TimeoutOpt = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        min=0.001,
        help="Remote paths: seconds to wait for each request [default: 30].",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="The model's config.json, when none sits beside the weights (a torch distributed "
        "checkpoint); dedupe -o places it in the output.",
        show_default=False,
    ),
]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="No progress output.")]

OutOpt = Annotated[
    Path | None,
    typer.Option(
        "-o",
        "--output",
        help="Write here instead of rewriting in place (a file for a file, a folder for a folder or sharded checkpoint).",
        show_default=False,
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
FsyncOpt = Annotated[
    bool,
    typer.Option(
        "--fsync",
        help="Make a new -o output durable (fsync) before exiting. In-place rewrites and "
        "replaced outputs are always fsynced before the rename.",
    ),
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show the plan; write nothing.")]
