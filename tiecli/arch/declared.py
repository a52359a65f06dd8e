"""Ties the architecture declares: the one answer, from transformers.

:func:`module_ties` answers for a live module (transformers 5's
``get_expanded_tied_weights_keys``; transformers 4's ties by identity and its
``_tied_weights_keys``). :func:`declared_ties` answers for a checkpoint's
``config.json``: the model is built on the ``meta`` device (no memory, no
random init, see :mod:`.build`) and asked the same question, in the names
``save_pretrained`` writes.

Importing transformers and building a model costs seconds, and the answer
depends only on the config and the transformers version, so it is cached on
disk (``$TIECLI_CACHE_DIR``, else ``$XDG_CACHE_HOME/tiecli``, else
``~/.cache/tiecli``); a repeated run never imports transformers. When no model
comes of the config, the reason becomes a note and detection falls back to the
pattern table.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import field
from pathlib import Path
from typing import Any

from ..lean import dataclass
from .build import (
    Budget,
    BuildRefused,
    build_model,
    quiet,
    transformers_available,
    transformers_version,
)
from .patterns import governing_flag


@dataclass
class Declared:
    """Ties an architecture declares, in the names ``save_pretrained`` writes.

    transformers 5 renames some weights between the module tree and the file
    (its conversion mapping: GPT-NeoX's ``lm_head.weight`` is ``embed_out.weight``
    on disk, Llava's ``model.language_model.*`` is ``language_model.model.*``).
    ``ties`` uses the file's names; ``renamed`` keeps ``{name in the model: name
    in the file}`` for every name that differs, so a file written with the
    model's own names (``save_original_format=False``, a plain ``state_dict()``)
    is read in those (:meth:`ties_for`).
    """

    ties: dict[str, str] = field(default_factory=dict)  # alias -> source, on-disk names
    architecture: str | None = None
    renamed: dict[str, str] = field(default_factory=dict)  # model name -> on-disk name

    def in_memory(self) -> dict[str, str]:
        """The ties in the model's own (in-memory) names."""
        back = {disk: mem for mem, disk in self.renamed.items()}
        return {back.get(a, a): back.get(s, s) for a, s in self.ties.items()}

    def ties_for(self, names: Any) -> dict[str, str]:
        """The ties in the naming the file ``names`` uses: the on-disk names, unless the
        file holds more of the model's own names than of the on-disk ones."""
        if not self.renamed:
            return self.ties
        present = set(names)
        memory = sum(1 for mem in self.renamed if mem in present)
        disk = sum(1 for d in self.renamed.values() if d in present)
        return self.in_memory() if memory > disk else self.ties


CACHE_FORMAT = 3  # 2: refusals keep their reason; 3: ties in on-disk names


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


def _cache_read(path: Path | None) -> tuple[bool, Declared | None, str | None]:
    """(hit, ties, why none); a cached refusal keeps its reason."""
    if path is None:
        return False, None, None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("unknown"):
            why = doc.get("why")
            return True, None, why if isinstance(why, str) else None
        ties = doc["ties"]
        if isinstance(ties, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in ties.items()
        ):
            renamed = doc.get("renamed") or {}
            if isinstance(renamed, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in renamed.items()
            ):
                return True, Declared(dict(ties), doc.get("architecture"), dict(renamed)), None
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    return False, None, None


def _cache_write(path: Path | None, declared: Declared | None, why: str | None) -> None:
    if path is None:
        return
    doc = (
        {"unknown": True, "why": why}
        if declared is None
        else {
            "architecture": declared.architecture,
            "ties": declared.ties,
            "renamed": declared.renamed,
        }
    )
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc), encoding="utf-8")
        os.replace(tmp, path)


def declared_ties(
    config_dir: Path, budget: Budget | None = None
) -> tuple[Declared | None, str | None]:
    """Ties declared by the architecture in ``config_dir/config.json``.

    ``(ties, None)``; or ``(None, why)`` when transformers builds no model from
    the config, and ``(None, None)`` when it is not installed: detection then
    falls back to tiecli's pattern table.
    """
    tf_version = transformers_version()
    if tf_version is None:
        return None, None
    cache = _cache_file(config_dir, tf_version)
    hit, cached, why = _cache_read(cache)
    if hit:
        return cached, why
    if not transformers_available():
        return None, None
    try:
        out = _ask_transformers(config_dir, budget)
    except BuildRefused as e:
        if e.lasting:
            _cache_write(cache, None, str(e))
        return None, str(e)
    _cache_write(cache, out, None)
    return out, None


def _ask_transformers(config_dir: Path, budget: Budget | None) -> Declared:
    model = build_model(config_dir, budget=budget)
    out = Declared(architecture=type(model).__name__)
    with quiet():
        memory = module_ties(model)
    out.renamed = on_disk_names(model, [*model.state_dict(keep_vars=True), *memory])
    out.ties = {out.renamed.get(a, a): out.renamed.get(s, s) for a, s in memory.items()}
    return out


def module_ties(module: Any) -> dict[str, str]:
    """``{alias: source}`` the module declares, in its own (in-memory) names.

    transformers 5 answers ``get_expanded_tied_weights_keys``. transformers 4
    ties parameters by identity (:func:`ties_by_identity`) and names its tied
    heads in ``_tied_weights_keys``, tied to the input embeddings unless the
    config turns off the flag the pattern table says governs them: those count
    even when the module has since broken the tie. Any other module declares
    the parameters it holds under several names.
    """
    expanded = getattr(module, "get_expanded_tied_weights_keys", None)
    if callable(expanded):
        return {str(a): str(s) for a, s in (expanded(all_submodels=True) or {}).items() if a != s}
    return ties_by_identity(module) | _tied_weights_keys(module)


def _tied_weights_keys(module: Any) -> dict[str, str]:
    """transformers 4's ``_tied_weights_keys``, each tied to the input embeddings."""
    keys = getattr(module, "_tied_weights_keys", None)
    if not isinstance(keys, (list, tuple)) or not hasattr(module, "get_input_embeddings"):
        return {}
    emb = module.get_input_embeddings()
    names: dict[int, str] = {}  # the first name of each parameter, as ties_by_identity's sources
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    source = names.get(id(getattr(emb, "weight", None)))
    if not source:
        return {}
    config = getattr(module, "config", None)

    def on(alias: str) -> bool:
        flag = governing_flag(alias)
        return config is None or flag is None or bool(getattr(config, flag, True))

    return {k: source for k in keys if k != source and k.endswith("weight") and on(k)}


def on_disk_names(model: Any, names: list[str]) -> dict[str, str]:
    """``{name in the model: name save_pretrained writes}`` for the ``names`` that differ.

    The reverse of transformers 5's conversion mapping, as ``save_pretrained``
    applies it to a model not loaded with ``from_pretrained``
    (``core_model_loading.revert_weight_conversion``): the model's transforms in
    reverse order, prefix changes dropped, a converter's renaming first, else
    every renaming in turn. transformers 4 (no mapping) saves the model's names.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            PrefixChange,
            WeightConverter,
            WeightRenaming,
            apply_converters,
            apply_renamings,
        )
    except ImportError:
        return {}
    try:
        with quiet():
            transforms = get_model_conversion_mapping(model, add_legacy=False) or []
            transforms = [t for t in transforms if not isinstance(t, PrefixChange)]
            reverse = [t.reverse_transform() for t in transforms[::-1]]
            renamings = [t for t in reverse if isinstance(t, WeightRenaming)]
            converters = [t for t in reverse if isinstance(t, WeightConverter)]
            out: dict[str, str] = {}
            for name in dict.fromkeys(names):
                new, pattern = apply_converters(name, converters)
                if pattern is None:
                    new = apply_renamings(name, renamings)
                if new != name:
                    out[name] = new
    except Exception:  # noqa: BLE001 - a transformers whose API differs: the model's names
        return {}
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
