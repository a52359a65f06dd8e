"""Remote paths: the options a URL is read with, and the download a rewrite of one
starts from (nothing is ever written to a remote location)."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ..errors import param
from ..progress import Progress
from .results import PathLike, RewriteResult

if TYPE_CHECKING:
    from ..formats.remote import RemoteOptions
    from ..options import RewriteOptions

R = TypeVar("R", bound=RewriteResult)


def remote_options(
    path: PathLike, max_download: int | None, timeout: float | None
) -> RemoteOptions | None:
    """Options for reading a URL; None for a local path (nothing remote is imported)."""
    if not isinstance(path, str) or "://" not in path:
        return None
    from ..formats.remote import RemoteOptions, is_remote

    if not is_remote(path):
        return None
    options = RemoteOptions()
    if max_download is not None:
        options.max_download = max_download
    if timeout is not None:
        options.timeout = timeout
    return options


def from_remote(
    path: PathLike,
    command: str,
    options: RewriteOptions,
    timeout: float | None,
    progress: Progress,
    rewrite: Callable[[Path], R],
) -> R | None:
    """``dedupe``/``untie`` of a URL: never in place (nothing is written to a remote
    location), so only with an output. The checkpoint is downloaded, streamed to disk,
    into a private folder beside the output, rewritten from there like a local one,
    and the download removed. Returns None for a local path."""
    reading = remote_options(path, None, timeout)
    if reading is None:
        return None
    import shutil
    import tempfile

    from ..errors import OutputError, UsageError
    from ..formats.remote import download, shown_url

    shown = shown_url(str(path))
    if options.output is None or options.dry_run:
        raise UsageError(
            f"is remote; {command} writes a local result only, with {param('output')} OUT (never in place, "
            "never a dry run: inspect reports what dedupe would save); nothing was changed",
            shown,
            hint=f"tiecli {command} {shlex.quote(shown)} -o LOCAL_OUTPUT",
        )
    out = options.output
    if (out.exists() or out.is_symlink()) and not options.force:
        raise OutputError(f"already exists; pass {param('force')} to replace it", out)
    if not out.parent.is_dir():
        raise OutputError("parent folder does not exist", out)
    staging = Path(tempfile.mkdtemp(prefix=".tiecli-download-", dir=out.parent))
    try:
        local, stats = download(str(path), staging, reading, progress)
        result = rewrite(local)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.path = shown
    result.remote = stats.to_dict()
    return result
