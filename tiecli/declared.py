"""Ties the architecture declares, asked of transformers.

The model is built on the ``meta`` device from ``config.json`` (no memory, no
random init) and asked for its ties: transformers v5 answers
``get_expanded_tied_weights_keys(all_submodels=True)`` as ``{alias: source}``;
v4 ties parameters by identity, which we read back from the module.

Importing transformers and building a model costs seconds, and the answer
depends only on the config and the transformers version, so it is cached on
disk (``$TIECLI_CACHE_DIR``, else ``$XDG_CACHE_HOME/tiecli``, else
``~/.cache/tiecli``); a repeated run never imports transformers.

The config is untrusted text from the checkpoint's folder, so the build runs
offline, never imports the folder's code (``trust_remote_code=False``), never
asks anything on stdin, and stops once the model outgrows the checkpoint.
When no model comes of it, the reason becomes a note and detection falls back
to the pattern table.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
CUSTOM_CODE = "config.json asks for custom code (auto_map), which tiecli never runs"


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


@contextlib.contextmanager
def _quiet() -> Any:
    """transformers talks on stderr (and prompts on stdout) while building; keep ours clean."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stderr(io.StringIO()),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)
        transformers.logging.set_verbosity(level)


@dataclass(frozen=True)
class Budget:
    """What the checkpoint holds: a model built from its config must be of its size.

    A config is text anyone can edit: ``num_hidden_layers: 100000`` beside a
    256-byte file would otherwise cost minutes and gigabytes to build. A model
    whose modules or parameters far outnumber the stored tensors, or whose
    computed buffers outweigh the weights, cannot be the model of this file.
    """

    tensors: int
    nbytes: int

    @classmethod
    def of(cls, entries: dict[str, Any]) -> Budget:
        """The budget of a checkpoint's entries: their count and their bytes."""
        return cls(len(entries), sum(e.nbytes for e in entries.values()))

    @property
    def modules(self) -> int:
        return 16 * self.tensors + 1000

    @property
    def parameters(self) -> int:
        return 4 * self.tensors + 256

    @property
    def buffer_bytes(self) -> int:
        return max(256 << 20, 2 * self.nbytes)

    @property
    def parameter_bytes(self) -> int:
        """Room for the weights in a wider dtype (fp32 from bf16) and tied copies."""
        return 4 * self.nbytes + (256 << 20)


class BuildRefused(Exception):
    """The config was not turned into a model; the message says why (for a note).

    ``lasting``: the refusal follows from the config and the transformers
    version alone, so it is cached with the config's answer; one that depends
    on the checkpoint's size or on this machine (memory, optional packages) is not.
    """

    def __init__(self, message: str, lasting: bool = True) -> None:
        super().__init__(message)
        self.lasting = lasting


class _OverBudget(BaseException):
    """Raised from inside module construction; BaseException so model code cannot swallow it."""


class _Prompted(BaseException):
    """Something asked a question on stdin while building."""


def _refuse_prompt(*_args: Any, **_kwargs: Any) -> str:
    raise _Prompted


# What the socket backstop of :func:`_offline` refused, for tests and debugging:
# offline mode should stop every request before it reaches a socket.
refused_network: list[str] = []


@contextlib.contextmanager
def _offline() -> Any:
    """No network, no prompt, while transformers builds a model from an untrusted config.

    Hub helpers are put in offline mode (huggingface_hub reads
    ``constants.HF_HUB_OFFLINE`` on every request, ``utils/_http.py``), and any
    socket that still tries to resolve or connect raises; ``input()`` raises
    instead of asking (transformers' ``resolve_trust_remote_code`` asks
    "Do you wish to run the custom code?" on stdin), and stdin reads as empty.
    """
    import socket

    patches: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, name: str, value: Any) -> None:
        patches.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def refuse(*args: Any, **_kwargs: Any) -> Any:
        refused_network.append(repr(args[:2])[:200])
        raise OSError("network access is disabled while tiecli reads a local checkpoint")

    try:
        import huggingface_hub.constants as hub_constants

        patch(hub_constants, "HF_HUB_OFFLINE", True)
    except ImportError:
        pass
    for name in ("getaddrinfo", "create_connection"):
        patch(socket, name, refuse)
    for name in ("connect", "connect_ex"):
        patch(socket.socket, name, refuse)
    patch(builtins, "input", _refuse_prompt)
    patch(sys, "stdin", io.StringIO())
    try:
        yield
    finally:
        for obj, name, value in reversed(patches):
            setattr(obj, name, value)


@contextlib.contextmanager
def _bounded(budget: Budget | None, real_buffers: bool) -> Any:
    """Count modules and parameters as they are made; stop past the budget.

    With ``real_buffers`` parameters go to the meta device as modules register
    them, while buffers stay real: buffers a model computes from its config
    (rotary frequencies, position ids) are then right without loading
    anything, and no time goes to initialising what the checkpoint replaces.
    """
    import torch

    module_init = torch.nn.Module.__init__
    register = torch.nn.Module.register_parameter
    counts = [0, 0]

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        counts[0] += 1
        if budget is not None and counts[0] > budget.modules:
            raise _OverBudget(
                f"it makes more than {budget.modules} modules for {budget.tensors} stored tensors"
            )
        module_init(self, *args, **kwargs)

    def register_parameter(module: Any, name: str, param: Any) -> None:
        register(module, name, param)
        if param is None:
            return
        counts[1] += 1
        if budget is not None and counts[1] > budget.parameters:
            raise _OverBudget(
                f"it has more than {budget.parameters} parameters for {budget.tensors} "
                f"stored tensors"
            )
        if real_buffers and not param.is_meta:
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.__init__ = init  # type: ignore[method-assign]
    torch.nn.Module.register_parameter = register_parameter  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Module.__init__ = module_init  # type: ignore[method-assign]
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def _buffer_bytes(model: Any) -> int:
    return sum(b.numel() * b.element_size() for b in model.buffers())


def build_model(config_dir: Path, real_buffers: bool = False, budget: Budget | None = None) -> Any:
    """The model class ``config_dir/config.json`` names, its parameters on the meta device.

    ``real_buffers`` keeps buffers on the CPU with their computed values (for
    running the model); otherwise everything is on meta. Nothing from the
    folder is imported (``trust_remote_code=False``), nothing is downloaded,
    nothing is asked on stdin, and the work is bounded by ``budget``. Raises
    :class:`BuildRefused` saying why no model was built.
    """
    import torch
    import transformers

    version = transformers.__version__
    if budget is not None:
        # transformers expands some counts while reading the config (a layer_types list
        # per layer): refuse counts the checkpoint cannot back before it reads a byte
        too_many = _layer_count_over(_config_dict(config_dir), budget.modules)
        if too_many is not None:
            raise BuildRefused(
                f"config.json says {too_many[0]}={too_many[1]}, more layers than "
                f"{budget.tensors} stored tensors can hold: it does not fit the checkpoint",
                lasting=False,
            )
    with _quiet(), _offline():
        try:
            config = transformers.AutoConfig.from_pretrained(
                str(config_dir), local_files_only=True, trust_remote_code=False
            )
        except _Prompted:
            raise BuildRefused(CUSTOM_CODE) from None
        except Exception as e:  # noqa: BLE001 - any config transformers refuses: fall back
            if "auto_map" in _config_dict(config_dir):
                raise BuildRefused(CUSTOM_CODE) from None
            raise BuildRefused(
                f"transformers {version} cannot read config.json ({_first(e)})"
            ) from None
        _no_pretrained_parts(config)
        cls = None
        names = [n for n in getattr(config, "architectures", None) or [] if isinstance(n, str)]
        for name in names:
            if name.isidentifier():
                cls = getattr(transformers, name, None)
            if cls is not None:
                break
        if cls is None:
            named = ", ".join(names) or "no architecture"
            raise BuildRefused(f"config.json names {named}, which transformers {version} lacks")
        if real_buffers:
            # Buffers are computed for real, and parameters made on the CPU before they
            # move to meta: weigh both on meta first.
            model = _build(cls, config, budget, torch.device("meta"), real_buffers=False)
            if budget is not None:
                _weigh(cls.__name__, model, budget)
            return _build(cls, config, budget, contextlib.nullcontext(), real_buffers=True)
        return _build(cls, config, budget, torch.device("meta"), real_buffers=False)


def _build(cls: Any, config: Any, budget: Budget | None, placement: Any, real_buffers: bool) -> Any:
    try:
        with placement, _bounded(budget, real_buffers):
            return cls._from_config(config)
    except _OverBudget as e:
        raise BuildRefused(
            f"{cls.__name__} from this config.json does not fit the checkpoint: {e}",
            lasting=False,
        ) from None
    except _Prompted:
        raise BuildRefused(f"building {cls.__name__} asks to run custom code") from None
    except Exception as e:  # noqa: BLE001 - a config this transformers cannot build
        # a missing optional package or memory is this machine's, not the config's
        lasting = not isinstance(e, (ImportError, MemoryError, OSError))
        raise BuildRefused(
            f"transformers cannot build {cls.__name__} ({_first(e)})", lasting=lasting
        ) from None


_LAYER_KEY = re.compile(r"(^|_)(layers?|depth)$")


def _layer_count_over(config: dict[str, Any], limit: int) -> tuple[str, int] | None:
    """A ``*_layers``/``n_layer``/``depth`` count in the config or a sub-config above ``limit``."""
    stack: list[Any] = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, (dict, list)):
                    stack.append(value)
                elif (
                    isinstance(value, int)
                    and not isinstance(value, bool)
                    and value > limit
                    and _LAYER_KEY.search(str(key))
                ):
                    return str(key), value
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))
    return None


def _weigh(name: str, model: Any, budget: Budget) -> None:
    """Refuse a meta-built model whose parameters or buffers outweigh the checkpoint."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = _buffer_bytes(model)
    for what, size, limit in (
        ("parameters", params, budget.parameter_bytes),
        ("buffers", buffers, budget.buffer_bytes),
    ):
        if size > limit:
            raise BuildRefused(
                f"{name} from this config.json computes {size} bytes of {what} for "
                f"{budget.nbytes} bytes of weights: the config does not describe this checkpoint",
                lasting=False,
            )


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _config_dict(config_dir: Path) -> dict[str, Any]:
    try:
        doc = json.loads((config_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def sub_configs(config: Any) -> Iterator[Any]:
    """A transformers config and every config nested in it (text, vision, audio...), once each."""
    seen: set[int] = set()
    stack = [config]
    while stack:
        c = stack.pop()
        if id(c) in seen:
            continue
        seen.add(id(c))
        yield c
        stack.extend(
            v for v in vars(c).values() if hasattr(v, "to_dict") and hasattr(v, "model_type")
        )


def _no_pretrained_parts(config: Any) -> None:
    """Backbones are built from their configs, never fetched (DETR-style ``use_pretrained_backbone``)."""
    for c in sub_configs(config):
        if getattr(c, "use_pretrained_backbone", False):
            with contextlib.suppress(Exception):
                c.use_pretrained_backbone = False


def build_meta_model(
    config_dir: Path, real_buffers: bool = False, budget: Budget | None = None
) -> Any:
    """:func:`build_model`, or None when no model can be built from the config."""
    try:
        return build_model(config_dir, real_buffers, budget)
    except BuildRefused:
        return None


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
    expanded = getattr(model, "get_expanded_tied_weights_keys", None)
    if callable(expanded):
        with _quiet():
            mapping = expanded(all_submodels=True) or {}
        memory = {str(a): str(s) for a, s in mapping.items() if a != s}
    else:
        memory = ties_by_identity(model)
    out.renamed = on_disk_names(model, [*model.state_dict(keep_vars=True), *memory])
    out.ties = {out.renamed.get(a, a): out.renamed.get(s, s) for a, s in memory.items()}
    return out


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
        with _quiet():
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
