"""Building the model to load: from ``config.json`` through transformers (on the meta
device, offline, bounded by the checkpoint), or from a ``module:function`` the user names."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint
from ..errors import CheckpointFormatError, MissingDependencyError, UsageError, param
from .result import BuildFailed


def _from_spec(spec: str) -> tuple[Any, Any]:
    """Call ``module:function``; it returns a module or (module, example input)."""
    model = param("model")
    if ":" not in spec:
        raise UsageError(f"{model} {spec!r}: expected module:function")
    mod_name, func_name = spec.split(":", 1)
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise UsageError(f"{model} {spec!r}: cannot import {mod_name!r} ({e})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UsageError(f"{model} {spec!r}: {mod_name} has no function {func_name!r}")
    made = func()
    example = None
    if isinstance(made, tuple):
        made, example = made[0], made[1]
    import torch

    if not isinstance(made, torch.nn.Module):
        raise UsageError(f"{model} {spec!r} returned a {type(made).__name__}, not an nn.Module")
    return made, example


def _from_config(ckpt: Checkpoint) -> Any:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "rebuilding a model from config.json needs transformers",
            ckpt.path,
            hint=f"pip install 'tiecli[hf]', or pass {param('model')} module:function",
        ) from None
    from ..arch.build import Budget, BuildRefused
    from ..arch.build import build_model as build_from_config

    assert ckpt.config_path is not None
    # bounded by the checkpoint, offline, without the folder's code: as detection builds it
    budget = Budget.of(ckpt.entries)
    try:
        return build_from_config(ckpt.config_path.parent, real_buffers=True, budget=budget)
    except BuildRefused as e:
        raise _not_built(ckpt, str(e)) from None


def _not_built(ckpt: Checkpoint, why: str) -> Exception:
    """Why no model: an architecture transformers lacks is a bad input (exit 2); a config it
    refuses, or a class that raises while it is built, a failed check naming the class."""
    import transformers

    config = ckpt.config or {}
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    known = [a for a in archs if a.isidentifier() and hasattr(transformers, a)]
    from ..arch.build import CUSTOM_CODE

    if why == CUSTOM_CODE:
        return CheckpointFormatError(
            f"{why}, so it cannot rebuild this model",
            ckpt.config_path,
            hint=f"build it yourself and pass {param('model')} module:function",
        )
    if not known:
        return CheckpointFormatError(
            f"config.json names architecture {', '.join(archs) or '(none named)'}, which "
            f"transformers {transformers.__version__} cannot build ({why})",
            ckpt.config_path,
            hint=f"upgrade transformers or pass {param('model')} module:function",
        )
    return BuildFailed(known[0], why)


def build_model(ckpt: Checkpoint, model_spec: str | None) -> tuple[Any, Any]:
    """(the model, the example input its ``module:function`` returned, or None)."""
    if model_spec:
        return _from_spec(model_spec)
    if ckpt.config is None:
        raise UsageError(
            "has no config.json beside it to rebuild the model from",
            ckpt.path,
            hint=f"pass {param('model')} module:function",
        )
    return _from_config(ckpt), None
