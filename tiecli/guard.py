"""Checking a live model's ties, right before it is saved."""

from __future__ import annotations

from typing import Any

from .arch.declared import module_ties
from .arch.storage import same_storage
from .errors import TieError


def check_model(module: Any, ties: dict[str, str] | None = None) -> None:
    """Raise :class:`TieError` listing every declared tie that is broken or drifted.

    A tie is healthy when alias and source are one parameter, or one storage
    viewed alike or transposed (:func:`~tiecli.arch.storage.same_storage`).
    ``ties`` adds ``{alias: source}`` pairs for modules that declare
    none (plain ``nn.Module``); names are state-dict names.
    """
    import torch

    wanted = module_ties(module) | dict(ties or {})
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(
        {n: b for n, b in module.named_buffers(remove_duplicate=False) if n not in tensors}
    )
    problems = []
    for alias, source in sorted(wanted.items()):
        a, s = tensors.get(alias), tensors.get(source)
        if a is None or s is None:
            missing = alias if a is None else source
            problems.append(f"{alias} -> {source}: {missing} is not a parameter of the model")
            continue
        if a is s or same_storage(a, s):
            continue
        if a.shape == s.shape:
            equal = torch.equal(a.detach(), s.detach())
        elif a.dim() == 2 and a.shape == s.shape[::-1]:
            equal = torch.equal(a.detach(), s.detach().t())
        else:
            equal = False
        if equal:
            problems.append(
                f"{alias} -> {source}: tie broken, the two are separate parameters (equal now, "
                f"they will drift apart in training); re-tie with model.tie_weights()"
            )
        else:
            diff = ""
            if a.shape == s.shape and a.is_floating_point():
                diff = f", max abs diff {float((a.detach() - s.detach()).abs().max()):g}"
            problems.append(f"{alias} -> {source}: tie broken and the copies differ{diff}")
    if problems:
        raise TieError(f"{len(problems)} broken tie(s): " + "; ".join(problems))
