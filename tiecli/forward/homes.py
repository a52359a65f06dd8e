"""Where a loaded parameter's weight lives, as one key that two names share exactly when
they are one weight: a storage on a device, or the copy accelerate offloads it to."""

from __future__ import annotations

from typing import Any

from ..arch.storage import where
from .result import RunStats


def home(model: Any, name: str, p: Any) -> tuple[Any, ...]:
    """Where the weight of parameter ``name`` lives: (place, which storage, where in it, ...).

    A parameter on a device is its storage there. One that accelerate offloads
    is a meta tensor in the model; its weight is what the offload hooks load:
    a CPU tensor of their state dict, or a file and name of the offload index.
    The place comes first: a device (``cpu``, ``cuda:0``), ``disk`` or ``meta``.
    """
    if not p.is_meta:
        return _stored(name, p)
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        hook = getattr(model.get_submodule(".".join(parts[:i])), "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or [hook]:
            weights = getattr(h, "weights_map", None)
            if weights is None or not getattr(h, "offload", False):
                continue
            loader = getattr(weights, "dataset", weights)
            key = getattr(weights, "prefix", "") + ".".join(parts[i:])
            state = getattr(loader, "state_dict", None) or {}
            if key in state:
                return _stored(key, state[key])
            info = (getattr(loader, "index", None) or {}).get(key)
            if info is not None:
                file = info.get("safetensors_file") or f"{loader.save_folder}/{key}.dat"
                return ("disk", file, info.get("weight_name", key))
    return ("meta", name, 0)


def _stored(name: str, t: Any) -> tuple[Any, ...]:
    """A real tensor's key: its storage, or its name alone where it has none to compare."""
    key = where(t)
    return key if key is not None else (str(t.device), name, 0)


def count(model: Any, stats: RunStats) -> None:
    """Add the model's parameters, and their bytes each weight once, to ``stats``."""
    seen: set[tuple[Any, ...]] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        size = p.numel() * p.element_size()
        stats.untied_bytes += size
        key = home(model, name, p)
        if key not in seen:
            seen.add(key)
            stats.unique_bytes += size
            stats.parameters += p.numel()
            stats.bytes_by_device[key[0]] = stats.bytes_by_device.get(key[0], 0) + size
