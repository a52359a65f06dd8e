"""Building a model from an untrusted config.json: offline, bounded, no custom code.

The config is text from the checkpoint's folder, so a build never reaches the
network, never imports the folder's code (``trust_remote_code=False``), never
asks anything on stdin, and stops once the model outgrows the checkpoint
(:class:`Budget`). When no model comes of it, :class:`BuildRefused` says why.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import logging
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..lean import dataclass

CUSTOM_CODE = "config.json asks for custom code (auto_map), which tiecli never runs"


def transformers_version() -> str | None:
    """The installed transformers version, found without importing it (None: unavailable)."""
    if "transformers" in sys.modules and sys.modules["transformers"] is None:
        return None  # import blocked
    import importlib.util

    try:
        spec = importlib.util.find_spec("transformers")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    # the installed distribution's record beside the package names the version:
    # importlib.metadata finds the same for some 13 ms of imports on every run
    for where in spec.submodule_search_locations or ():
        records = list(Path(where).parent.glob("transformers-*.dist-info"))
        if len(records) == 1:
            return records[0].name[len("transformers-") : -len(".dist-info")]
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


@contextlib.contextmanager
def quiet() -> Any:
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


# What the socket backstop of :func:`offline` refused, for tests and debugging:
# offline mode should stop every request before it reaches a socket.
refused_network: list[str] = []


@contextlib.contextmanager
def offline() -> Any:
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
def bounded(budget: Budget | None, real_buffers: bool) -> Any:
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
    with quiet(), offline():
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
                weigh(cls.__name__, model, budget)
            return _build(cls, config, budget, contextlib.nullcontext(), real_buffers=True)
        return _build(cls, config, budget, torch.device("meta"), real_buffers=False)


def _build(cls: Any, config: Any, budget: Budget | None, placement: Any, real_buffers: bool) -> Any:
    try:
        with placement, bounded(budget, real_buffers):
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


def weigh(name: str, model: Any, budget: Budget) -> None:
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
