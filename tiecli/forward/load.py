"""Loading a checkpoint into a rebuilt model with its ties restored: each stored tensor read
once and put where the model's names live (a device, or accelerate's offload folder), every
tie one storage there, the model then dispatched as the placement asks."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..arch.declared import module_ties
from ..checkpoint import Checkpoint
from ..detect import find_ties
from ..errors import UsageError
from ..formats import open_checkpoint
from ..ties import Tie
from .dispatch import device_of, dispatch, infer_device_map, main_device, offload
from .homes import count
from .names import loaded_dtypes, model_names, renamed, sources
from .placement import Placement
from .reader import Reader, put
from .result import LoadFailed, RunStats
from .tie_placement import check_ties_placed, wanted


def load_onto(
    model: Any,
    path: Path,
    device: Any,
    dtype: Any,
    use_transformers: bool,
    *,
    placement: Placement | dict[str, Any] | None = None,
    offload_dir: Path | None = None,
) -> tuple[Any, list[str], RunStats, list[Tie]]:
    """Load the checkpoint at ``path`` into ``model``; (model, problems, stats, ties).

    Everything goes to ``device``, or, with ``placement`` (a :class:`Placement`
    or a device map already made, ``{module: torch device or "disk"}``), where
    accelerate places each module: GPUs, the CPU, and ``offload_dir`` on disk.
    Tensors are read one at a time and go straight to their device.
    """
    import torch

    started = time.perf_counter()
    stats = RunStats()
    with open_checkpoint(path, torch_free=False) as ckpt:
        report = find_ties(ckpt, use_transformers=use_transformers)
        given = sources(ckpt, report)
        alias_of = {
            t.alias: t
            for t in report.ties
            if t.kind == "tied" and t.drift is None and t.source in given
        }
        mapping, groups = model_names(model, list(given))
        ties = renamed(report.ties, mapping)
        declared = module_ties(model)
        keep = wanted(ties, declared)
        _tie_on_meta(model, {a: s for a, (s, how) in keep.items() if how == "identity"})
        params = {n for n, _ in model.named_parameters(remove_duplicate=False)}

        device_map: dict[str, Any] | None = None
        if isinstance(placement, Placement):
            device_map, stats.max_memory = infer_device_map(
                model, placement, loaded_dtypes(ckpt, given, mapping, dtype)
            )
        elif placement is not None:
            device_map = dict(placement)
        if device_map is not None:
            check_ties_placed(keep, params, device_map)
            if any(d == "disk" for d in device_map.values()) and offload_dir is None:
                raise UsageError("the placement offloads to disk, but no offload folder was given")
            stats.device_map = device_map

        stream = _Stream(ckpt, given, alias_of, device, device_map, params, offload_dir, dtype)
        stream.run(model, mapping, groups, stats)
    placed, index = stream.placed, stream.index
    # ties the architecture declares whose alias the file leaves out (transformers 5
    # saves them so): the alias is the source's storage, as transformers ties it
    for alias, source in declared.items():
        if alias not in placed and source in placed:
            placed[alias] = placed[source]
            if source in index:
                index[alias] = index[source]
            stats.shared_ties += 1
    # assign: the model's parameters become the placed tensors, so ties stay one storage
    try:
        result = model.load_state_dict(placed, strict=False, assign=True)
    except RuntimeError as e:  # shapes the model does not have (config and weights disagree)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "load failed")
        raise LoadFailed(f"the weights do not fit the model: {detail}") from None
    _one_parameter_per_tensor(model, placed)
    problems = []
    never_saved = _never_saved(model, result.missing_keys)
    if never_saved:
        _initialise(model, never_saved, stream.loaded_on)
    missing = [k for k in result.missing_keys if k not in never_saved]
    stats.missing = len(missing)
    if missing:
        problems.append(
            f"missing from the checkpoint: {', '.join(missing[:8])}"
            + (" ..." if len(missing) > 8 else "")
        )
    if result.unexpected_keys:
        problems.append(f"not used by the model: {', '.join(result.unexpected_keys[:8])}")
    for prefix, mod in model.named_modules():  # buffers were built on the CPU
        for name, buf in mod._buffers.items():
            if buf is not None and not buf.is_meta:
                mod._buffers[name] = buf.to(stream.where(f"{prefix}.{name}" if prefix else name))
    model.eval()
    if device_map is not None:
        stats.offloaded = dispatch(model, device_map, stream.main, offload_dir, index)
    stats.load_seconds = time.perf_counter() - started
    count(model, stats)
    if stream.main.type == "cuda":
        torch.cuda.synchronize(stream.main)
    return model, problems, stats, ties


class _Stream:
    """The checkpoint's tensors, read one at a time, put where the model's names live.

    ``placed`` ends as ``{model name: tensor}`` (a meta stand-in for a weight
    offloaded to disk) and ``index`` as accelerate's offload index of those.
    An alias the file holds is not read twice: it views its source's tensor.
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        sources: dict[str, tuple[str, bool]],
        alias_of: dict[str, Tie],
        device: Any,
        device_map: dict[str, Any] | None,
        params: set[str],
        offload_dir: Path | None,
        dtype: Any,
    ):
        import torch

        self.cpu = torch.device("cpu")
        self.sources, self.alias_of, self.params = sources, alias_of, params
        self.device, self.device_map = device, device_map
        # where inputs go and offloaded layers run
        self.main = main_device(device_map) if device_map is not None else device
        self.offload_dir, self.dtype = offload_dir, dtype
        self.reader = Reader(ckpt)
        self.placed: dict[str, Any] = {}  # model name -> tensor (a meta stand-in when on disk)
        self.index: dict[str, dict[str, str]] = {}  # model name -> where its weight is on disk
        self.kept: dict[str, Any] = {}  # file name -> placed tensor, for the aliases that view it
        self.kept_on_disk: dict[str, dict[str, str]] = {}  # file name -> its offload index entry
        self.needed = {t.source for t in alias_of.values()}

    def where(self, name: str) -> Any:
        """The device a tensor is loaded on; ``"disk"`` for a parameter offloaded to disk."""
        if self.device_map is None:
            return self.device
        d = device_of(name, self.device_map)
        if d is None:  # a name the model does not have: reported as unexpected
            return self.main
        return self.cpu if d == "disk" and name not in self.params else d

    def loaded_on(self, name: str) -> Any:
        """The device a tensor is made on: the CPU for one bound for disk."""
        d = self.where(name)
        return self.cpu if d == "disk" else d

    def land(self, target: str, t: Any, stats: RunStats) -> Any:
        """``t`` (on the CPU when bound for disk) where ``target`` lives."""
        import torch

        d = self.where(target)
        if d != "disk":
            return t if t.device == d else t.to(d)
        assert self.offload_dir is not None
        self.index[target] = offload(t, self.offload_dir, len(self.index))
        stats.offload_bytes += t.numel() * t.element_size()
        return torch.empty_like(t, device="meta")

    def read(self, name: str, target: str, at_once: bool = False) -> Any:
        """The file's tensor ``name`` on the device ``target`` loads on; ``at_once``:
        the caller copies it to a GPU or writes it to disk before the next read."""
        alias_of, dtype = self.alias_of, self.dtype
        if name in alias_of and alias_of[name].source in self.kept:
            src = self.kept[alias_of[name].source]
            return src if alias_of[name].transform == "identity" else src.t()
        stored, transposed = self.sources[name]
        d = self.where(target)
        reuse = at_once and (d == "disk" or d.type != "cpu")
        t, fresh = self.reader.read(stored, reuse=reuse)
        if reuse and d == "disk":  # written from where it was read: no copy
            t = t.t() if transposed else t
            if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                t = t.to(dtype)
        else:
            t = put(t, fresh, transposed, self.cpu if d == "disk" else d, dtype)
        if name in self.needed:
            self.kept[name] = t
        return t

    def run(
        self, model: Any, mapping: dict[str, str], groups: dict[str, Any], stats: RunStats
    ) -> None:
        """Every name in transformers' reading order; merged names through their converter;
        the aliases last, as views of their sources."""
        import torch

        placed, kept = self.placed, self.kept
        in_group = {n for _, names in groups.values() for n, _ in names}
        for name in mapping:  # in transformers' reading order
            if name in self.alias_of or name in in_group:
                continue
            target = mapping[name]
            placed[target] = self.land(target, self.read(name, target, at_once=True), stats)
            if name in self.needed:
                kept[name] = placed[target]
                if target in self.index:
                    self.kept_on_disk[name] = self.index[target]
        for target, (converter, names) in groups.items():
            for name, pattern in names:
                converter.add_tensor(
                    target, name, pattern, lambda n=name, t=target: self.read(n, t)
                )
            for full, t in converter.convert(target, model=model, config=model.config).items():
                # a merged tensor is a new allocation; a split one a view into it: copy both alike
                placed[full] = self.land(
                    full, t.clone(memory_format=torch.contiguous_format), stats
                )
        for name, tie in self.alias_of.items():
            target = mapping[name]
            if name in in_group or tie.source not in kept:
                continue
            src = kept[tie.source]
            placed[target] = src if tie.transform == "identity" else src.t()
            if tie.source in self.kept_on_disk:
                self.index[target] = self.kept_on_disk[tie.source]
            stats.shared_ties += 1
        kept.clear()


def _tie_on_meta(model: Any, pairs: dict[str, str]) -> None:
    """Each identity tie one parameter of the unloaded model, so accelerate keeps it together."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, source in pairs.items():
        a, s = params.get(alias), params.get(source)
        if a is None or s is None or a is s or not a.is_meta or a.shape != s.shape:
            continue
        owner, _, leaf = alias.rpartition(".")
        setattr(model.get_submodule(owner), leaf, s)


def _never_saved(model: Any, missing: list[str]) -> set[str]:
    """Missing parameters the architecture never writes and always computes on load
    (``_keys_to_ignore_on_save``: Marian's sinusoidal position tables), where every
    parameter of their module is missing: transformers initialises those modules from
    the config alone, so the forward pass may too."""
    import re

    patterns = getattr(model, "_keys_to_ignore_on_save", None) or []
    ignored = {k for k in missing if any(re.search(p, k) for p in patterns)}
    out: set[str] = set()
    for key in ignored:
        prefix = key.rpartition(".")[0]
        module = model.get_submodule(prefix)
        names = {f"{prefix}.{n}" for n, _ in module.named_parameters(recurse=False)}
        if names <= ignored:
            out |= names
    return out


def _initialise(model: Any, names: set[str], place: Callable[[str], Any]) -> None:
    """Give each parameter in ``names`` (still on meta) storage on its device and let the
    model's own ``_init_weights`` fill its module, as ``from_pretrained`` does."""
    import torch

    for prefix in sorted({n.rpartition(".")[0] for n in names}):
        module = model.get_submodule(prefix)
        for name, p in list(module.named_parameters(recurse=False)):
            fresh = torch.empty(p.shape, dtype=p.dtype, device=place(f"{prefix}.{name}"))
            setattr(module, name, torch.nn.Parameter(fresh, requires_grad=False))
        with torch.no_grad():
            model._init_weights(module)


def _one_parameter_per_tensor(model: Any, placed: dict[str, Any]) -> None:
    """Names given one tensor become one parameter, as ``tie_weights`` leaves them.

    ``load_state_dict(assign=True)`` wraps each name's tensor in a parameter
    of its own; a tie that is one parameter is what accelerate's dispatch
    keeps together (``find_tied_parameters``, ``retie_parameters``).
    """
    first: dict[int, Any] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        t = placed.get(name)
        if t is None:
            continue
        if id(t) not in first:
            first[id(t)] = p
        elif first[id(t)] is not p:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, first[id(t)])
