"""The checkpoint's names as the model's: which stored tensor gives each name (ties
restored), how transformers renames and merges them, and the dtype each is loaded in."""

from __future__ import annotations

from copy import deepcopy
from dataclasses import replace
from typing import Any

from ..checkpoint import Checkpoint
from ..errors import TieRecordError
from ..grouping import fills
from ..ties import Tie, TieReport


def sources(ckpt: Checkpoint, report: TieReport) -> dict[str, tuple[str, bool]]:
    """``{name: (stored name, transposed)}`` for every name the model is given.

    Names the file leaves out come from their tie, as :func:`tiecli.load`
    restores them (an absent alias from its source, an absent source from
    its alias); a malformed tie record is an error.
    """
    bad = [p for p in report.problems if p.code == "bad-record"]
    if bad:
        raise TieRecordError(bad[0].message, ckpt.path)
    src = {n: (n, False) for n in ckpt.entries}
    for f in fills(report.ties, ckpt.entries):
        src[f.name] = (f.origin, f.transform == "transpose")
    return src


def model_names(model: Any, names: list[str]) -> tuple[dict[str, str], dict[str, Any]]:
    """The file's names as the model's, the way transformers' loader renames them.

    transformers 5 saves composite models under their original names
    (``language_model.model.embed_tokens.weight``) and mixture-of-experts
    layers one tensor per expert; loading renames the first and merges the
    second (``WeightConverter``: stack, concatenate, split). Returns
    ``{name in the file: name in the model}`` and, for names a converter
    merges, ``{model name: (converter, [(name in the file, pattern)])}``,
    in the order transformers reads them.
    """
    same = {n: n for n in names}
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )
    except ImportError:  # transformers 4, or none: names are used as they are
        return same, {}
    if not isinstance(model, PreTrainedModel):
        return same, {}
    try:
        transforms = get_model_conversion_mapping(model)
    except (AttributeError, TypeError, ValueError):  # a transformers whose API differs
        return same, {}
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {k: c for c in converters for k in c.source_patterns}
    wanted = model.state_dict()
    prefix = model.base_model_prefix
    mapping: dict[str, str] = {}
    groups: dict[str, Any] = {}
    for name in sorted(names, key=dot_natural_key):  # experts in order, as transformers reads
        new, pattern = rename_source_key(name, renamings, converters, prefix, wanted)
        if new not in wanted and name in wanted:
            new, pattern = name, None
        mapping[name] = new
        if pattern is not None:
            if new not in groups:
                groups[new] = (deepcopy(by_pattern[pattern]), [])
            groups[new][1].append((name, pattern))
    return mapping, groups


def renamed(ties: list[Tie], mapping: dict[str, str]) -> list[Tie]:
    """``ties`` between the model's names."""
    return [
        replace(t, alias=mapping.get(t.alias, t.alias), source=mapping.get(t.source, t.source))
        for t in ties
    ]


def loaded_dtypes(
    ckpt: Checkpoint,
    sources: dict[str, tuple[str, bool]],
    mapping: dict[str, str],
    dtype: Any,
) -> dict[str, Any]:
    """``{model name: dtype it is loaded in}``, for accelerate to size the modules by."""
    import torch

    from ..dtypes import CODE_TO_TORCH

    out = {}
    for name, (stored, _) in sources.items():
        code = CODE_TO_TORCH.get(ckpt.entries[stored].dtype)
        if code is None:
            continue
        t = getattr(torch, code)
        out[mapping.get(name, name)] = dtype if dtype is not None and t.is_floating_point else t
    return out
