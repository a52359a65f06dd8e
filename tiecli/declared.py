"""Ties the architecture declares, asked of transformers.

The model is built on the ``meta`` device from ``config.json`` (no memory, no
random init) and asked for its ties: transformers v5 answers
``get_expanded_tied_weights_keys(all_submodels=True)`` as ``{alias: source}``;
v4 ties parameters by identity, which we read back from the module.

Importing transformers and building a model costs seconds, and the answer
depends only on the config and the transformers version, so it is cached on
disk (``$TIECLI_CACHE_DIR``, else ``$XDG_CACHE_HOME/tiecli``, else
``~/.cache/tiecli``); a repeated run never imports transformers.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Declared:
    ties: dict[str, str] = field(default_factory=dict)  # alias -> source
    architecture: str | None = None


CACHE_FORMAT = 1


def transformers_version() -> str | None:
    """The installed transformers version, found without importing it (None: unavailable)."""
    if "transformers" in sys.modules and sys.modules["transformers"] is None:
        return None  # import blocked
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return None


def transformers_available() -> bool:
    if transformers_version() is None:
        return False
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _cache_file(config_dir: Path, tf_version: str) -> Path | None:
    try:
        raw = (config_dir / "config.json").read_bytes()
    except OSError:
        return None
    root = os.environ.get("TIECLI_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "tiecli",
    )
    key = hashlib.sha256(f"{CACHE_FORMAT}\0{tf_version}\0".encode() + raw).hexdigest()
    return Path(root) / "declared" / f"{key}.json"


def _cache_read(path: Path | None) -> tuple[bool, Declared | None]:
    if path is None:
        return False, None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("unknown"):
            return True, None
        ties = doc["ties"]
        if isinstance(ties, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in ties.items()
        ):
            return True, Declared(dict(ties), doc.get("architecture"))
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    return False, None


def _cache_write(path: Path | None, declared: Declared | None) -> None:
    if path is None:
        return
    doc = (
        {"unknown": True}
        if declared is None
        else {"architecture": declared.architecture, "ties": declared.ties}
    )
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc), encoding="utf-8")
        os.replace(tmp, path)


@contextlib.contextmanager
def _quiet() -> Any:
    """transformers talks on stderr while building models; keep ours clean."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)
        transformers.logging.set_verbosity(level)


@contextlib.contextmanager
def _parameters_on_meta() -> Any:
    """Parameters go to the meta device as modules register them; buffers stay real.

    Buffers a model computes from its config (rotary frequencies, position ids)
    are then right without loading anything, while no memory or time goes to
    initialising parameters that the checkpoint replaces.
    """
    import torch

    original = torch.nn.Module.register_parameter

    def register(module: Any, name: str, param: Any) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_meta_model(config_dir: Path, real_buffers: bool = False) -> Any:
    """The model class the config names, its parameters on the meta device; None if unknown.

    ``real_buffers`` keeps buffers on the CPU with their computed values (for
    running the model); otherwise everything is on meta.
    """
    import torch
    import transformers

    with _quiet():
        try:
            config = transformers.AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
        except Exception:  # noqa: BLE001 - any config transformers refuses: fall back to patterns
            return None
        cls = None
        for name in getattr(config, "architectures", None) or []:
            if not isinstance(name, str) or not name.isidentifier():
                continue
            cls = getattr(transformers, name, None)
            if cls is not None:
                break
        if cls is None:
            return None
        placement = _parameters_on_meta() if real_buffers else torch.device("meta")
        with placement:
            try:
                return cls._from_config(config)
            except Exception:  # noqa: BLE001 - a config this transformers cannot build
                return None


def declared_ties(config_dir: Path) -> Declared | None:
    """Ties declared by the architecture in ``config_dir/config.json``.

    None when transformers is not installed or does not know the architecture:
    detection then falls back to tiecli's pattern table.
    """
    tf_version = transformers_version()
    if tf_version is None:
        return None
    cache = _cache_file(config_dir, tf_version)
    hit, cached = _cache_read(cache)
    if hit:
        return cached
    if not transformers_available():
        return None
    out = _ask_transformers(config_dir)
    _cache_write(cache, out)
    return out


def _ask_transformers(config_dir: Path) -> Declared | None:
    model = build_meta_model(config_dir)
    if model is None:
        return None
    out = Declared(architecture=type(model).__name__)
    expanded = getattr(model, "get_expanded_tied_weights_keys", None)
    if callable(expanded):
        with _quiet():
            mapping = expanded(all_submodels=True) or {}
        out.ties = {str(a): str(s) for a, s in mapping.items() if a != s}
        return out
    out.ties = ties_by_identity(model)
    return out


def ties_by_identity(module: Any) -> dict[str, str]:
    """``{alias: source}`` for parameters a module holds under several names.

    The source is the first name in registration order (the input embedding,
    T5's ``shared``), which is how transformers v4 declares them.
    """
    first: dict[int, str] = {}
    ties: dict[str, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in first:
            ties[name] = first[key]
        else:
            first[key] = name
    return ties
