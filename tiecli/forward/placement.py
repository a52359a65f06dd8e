"""The placement a forward check is asked for: a device map and the memory of each device,
parsed from their text (``auto``, ``0=60GiB,cpu=100GiB,disk=1TB``) into a :class:`Placement`."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ..errors import UsageError, param
from ..lean import dataclass
from .devices import device_key, resolve_device

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)")


@dataclass
class Placement:
    """How ``device_map`` places a model, through accelerate.

    ``spec`` is one of :data:`DEVICE_MAPS` or a ``{module: device}`` map
    (device: a GPU index, ``"cpu"`` or ``"disk"``); ``max_memory`` is
    ``{device: bytes}``; ``gpus`` says whether GPUs may be used at all.
    """

    spec: str | dict[str, int | str]
    max_memory: dict[int | str, int] | None = None
    gpus: bool = True


def parse_size(text: str, option: str = "max_memory") -> int:
    """``60GiB``, ``1.5GB``, ``20KB`` or plain bytes; GB/MB/KB are powers of 10, GiB/MiB/KiB of 2.

    ``option`` is the parameter the size was given in, named in a refusal."""
    m = _SIZE.fullmatch(text.strip().lower())
    if m is None or m.group(2) not in _UNITS:
        raise UsageError(
            f"{param(option)}: {text.strip()!r} is not a size (bytes, or a number with KB, MB, "
            f"GB, TB, KiB, MiB, GiB or TiB)"
        )
    value = float(m.group(1)) * _UNITS[m.group(2)]
    if not math.isfinite(value) or value > 1 << 80:
        raise UsageError(f"{param(option)}: {text.strip()!r} is larger than any machine's memory")
    return int(value)


def parse_max_memory(text: str | dict[Any, Any]) -> dict[int | str, int]:
    """``0=60GiB,1=60GiB,cpu=100GiB,disk=500GiB`` as ``{0: bytes, 1: bytes, "cpu": bytes, ...}``."""
    option = "max_memory"
    pairs = list(text.items()) if isinstance(text, dict) else []
    if isinstance(text, str):
        for item in text.split(","):
            if "=" not in item:
                raise UsageError(
                    f"{param(option)} {text!r}: expected DEVICE=SIZE pairs separated by commas "
                    f"(e.g. 0=60GiB,cpu=100GiB,disk=500GiB)"
                )
            key, value = item.split("=", 1)
            pairs.append((key, value))
    out: dict[int | str, int] = {}
    for key, value in pairs:
        device = device_key(str(key), option)
        if device in out:
            raise UsageError(f"{param(option)}: {str(key).strip()!r} is given twice")
        out[device] = value if isinstance(value, int) else parse_size(str(value), option)
    if not any(k != "disk" for k in out):
        raise UsageError(
            f"{param(option)}: give the memory of a GPU or the CPU too (e.g. cpu=16GiB)"
        )
    return out


def parse_device_map(text: str | dict[str, Any]) -> str | dict[str, int | str]:
    """``auto``, ``balanced``, ``balanced_low_0``, ``sequential``, or a JSON ``{module: device}``."""
    option = "device_map"
    if isinstance(text, str) and text.strip() in DEVICE_MAPS:
        return text.strip()
    loaded: Any = text
    if isinstance(text, str):
        try:
            loaded = json.loads(text)
        except ValueError:
            loaded = None
    if not isinstance(loaded, dict) or not loaded:
        raise UsageError(
            f"{param(option)} {str(text)[:80]!r}: expected {', '.join(DEVICE_MAPS)}, or a JSON "
            f'object {{"module name": device}} with a GPU index, "cpu" or "disk" for each'
        )
    out: dict[str, int | str] = {}
    for module, device in loaded.items():
        if isinstance(device, bool) or not isinstance(device, (int, str)):
            raise UsageError(f"{param(option)}: {device!r} (for {module!r}) is not a device")
        out[str(module)] = device_key(str(device), option)
    return out


def placement_for(
    device_map: str | dict[str, Any] | None, max_memory: str | dict[Any, Any] | None, device: str
) -> Placement | None:
    """The placement the options ask for; None without ``device_map``."""
    if device_map is None:
        if max_memory is not None:
            raise UsageError(
                f"{param('max_memory')} goes with {param('device_map')} "
                "(auto, balanced or sequential)"
            )
        return None
    spec = parse_device_map(device_map)
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(
            f"{param('device')} {device} with {param('device_map')}: the map chooses the devices "
            f"(use {param('device')} cpu, cuda or auto, and {param('max_memory')} to choose GPUs)"
        )
    if device == "cuda":
        resolve_device(device)  # CUDA must be there
    gpus = device != "cpu"
    memory = parse_max_memory(max_memory) if max_memory is not None else None
    if isinstance(spec, dict) and memory is not None:
        raise UsageError(
            f"{param('max_memory')} goes with {param('device_map')} auto, balanced or sequential"
        )
    used = list(spec.values()) if isinstance(spec, dict) else list(memory or {})
    if not gpus and any(isinstance(d, int) for d in used):
        raise UsageError(f"{param('device')} cpu leaves GPUs out, but the placement names one")
    return Placement(spec, memory, gpus)
