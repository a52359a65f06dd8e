"""The devices a forward check runs on: the device asked for, the GPUs there, their names,
and the memory a run takes and gives back."""

from __future__ import annotations

import sys
from typing import Any

from ..errors import UsageError, param


def resolve_device(device: str) -> Any:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a torch device that is here."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(
            f"{param('device')} {device!r} is not a device (use auto, cpu, cuda or cuda:N)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"{param('device')} cuda asked for, but CUDA is not available here; "
                f"use {param('device')} cpu or auto"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"{param('device')} {device}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    elif dev.type != "cpu":
        raise UsageError(f"{param('device')} {device!r}: only cpu and cuda are supported")
    return dev


def device_name(dev: Any) -> str:
    """The GPU's name, or the CPU's model name."""
    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_key(text: str, option: str) -> int | str:
    """A GPU index, ``cuda:N``, ``cuda`` (GPU 0), ``cpu`` or ``disk``, as accelerate names it.

    ``option`` is the parameter the text was given in, named in a refusal."""
    key = text.strip().lower()
    if key in ("cpu", "disk"):
        return key
    number = key[5:] if key.startswith("cuda:") else ("0" if key == "cuda" else key)
    if not number.isdigit():
        raise UsageError(
            f"{param(option)}: {text.strip()!r} is not a device (a GPU index, cuda:N, cpu or disk)"
        )
    index = int(number)
    if index >= gpu_count():
        raise UsageError(
            f"{param(option)}: GPU {index} asked for, but {gpu_count() or 'no'} CUDA device(s) "
            "are here"
        )
    return index


def host_peak() -> int:
    """The process's resident-memory high-water mark, in bytes (0 where unknown)."""
    try:
        import resource
    except ImportError:  # not on this platform
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def release(gpus: list[int]) -> None:
    """Memory of a model run is given back before the next one loads."""
    import gc

    gc.collect()
    if gpus:
        import torch

        torch.cuda.empty_cache()
