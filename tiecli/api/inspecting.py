"""``inspect``: the tensors, ties and problems of a checkpoint, and what each consumer
loads from it; also the consumer predictions and ``config`` that ``verify`` and
``dedupe`` share."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint import Checkpoint
from ..detect import find_ties
from ..errors import param
from ..formats import open_checkpoint
from ..progress import NO_PROGRESS, Progress
from ..ties import Problem, TieReport
from .remote import remote_options
from .results import InspectResult, PathLike

if TYPE_CHECKING:
    from ..consumers import ConsumerLoad


def consumer_loads(
    ckpt: Checkpoint, report: TieReport, only: str | None = None
) -> tuple[list[ConsumerLoad], list[Problem]]:
    """What each consumer (``only``: those ``for_consumers`` names) loads, and the problems that makes."""
    from ..consumer_choice import select
    from ..consumers import predict

    return predict(report.ties, ckpt.entries, ckpt.config, ckpt.format, select(only))


def fold_consumer_problems(problems: list[Problem], found: list[Problem]) -> list[Problem]:
    """Consumer findings about tensors an existing problem already names are attached to
    it when that problem is as severe (it already fails, or warns of a warning); the
    others are problems of their own, so a warning never hides a failing consumer."""
    rank = {"warning": 0, "error": 1}
    out = []
    for f in found:
        home = next(
            (
                p
                for p in problems
                if f.tensors
                and set(f.tensors) <= set(p.tensors)
                and rank.get(p.severity, 1) >= rank.get(f.severity, 1)
            ),
            None,
        )
        if home is not None:
            home.related.append(f)
        else:
            out.append(f)
    return out


def _inspect_opened(ckpt: Checkpoint, report: TieReport) -> InspectResult:
    loads, found = consumer_loads(ckpt, report)
    return InspectResult(
        path=ckpt.shown,
        format=ckpt.format,
        tensors=len(ckpt.entries),
        bytes=ckpt.stored_bytes(),
        ties=report.ties,
        dedupable_bytes=report.dedupable_bytes,
        problems=report.problems,
        declared_by=report.declared_by,
        nested_key=ckpt.nested_key,
        config=ckpt.config_url or (str(ckpt.config_path) if ckpt.config_path else None),
        notes=list(ckpt.notes),
        bytes_read=ckpt.bytes_read,
        consumers=loads,
        consumer_problems=found,
        remote=ckpt.remote.to_dict() if ckpt.remote is not None else None,
    )


def inspect(
    path: PathLike,
    *,
    use_transformers: bool = True,
    progress: Progress = NO_PROGRESS,
    max_download: int | None = None,
    timeout: float | None = None,
    config: PathLike | None = None,
) -> InspectResult:
    """Tensors, ties and problems of the checkpoint at ``path``; changes nothing.

    ``path`` may be a URL (``hf://owner/repo[@revision][/folder]``, ``https://``,
    any fsspec URL): it is read by ranges, downloading at most ``max_download``
    bytes of whole tensors to confirm ties, each request given ``timeout`` seconds.
    """
    from ..checkpoint import collecting_less

    options = remote_options(path, max_download, timeout)
    with collecting_less(), open_checkpoint(path, remote=options, progress=progress) as ckpt:
        use_config(ckpt, config)
        report = find_ties(ckpt, use_transformers=use_transformers, progress=progress)
        return _inspect_opened(ckpt, report)


def use_config(ckpt: Checkpoint, config: PathLike | None) -> None:
    """Describe the checkpoint with the ``config.json`` the user named (``--config``),
    in place of one beside it."""
    if config is None:
        return
    from ..errors import CheckpointFormatError, CheckpointNotFoundError
    from ..formats import read_json

    path = Path(config)
    if not path.is_file():
        raise CheckpointNotFoundError(f"no such file (given with {param('config')})", path)
    doc = read_json(path, what="config.json")
    if not isinstance(doc, dict):
        raise CheckpointFormatError("config.json is not a JSON object", path)
    ckpt.config, ckpt.config_path = doc, path
