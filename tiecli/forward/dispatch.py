"""accelerate's side of a placement: the device map it infers (or the one given, checked),
the offload folder weights are written to, and the dispatch that puts a model in place."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import MissingDependencyError, UsageError, param
from ..io import PAGE
from .placement import Placement
from .result import LoadFailed, cause


def to_device(d: int | str) -> Any:
    """accelerate's name of a device as a torch device; ``"disk"`` stays a string."""
    import torch

    if d == "disk":
        return "disk"
    if isinstance(d, int) or (isinstance(d, str) and d.isdigit()):
        return torch.device("cuda", int(d))
    return torch.device(d)


def device_of(name: str, device_map: dict[str, Any]) -> Any:
    """The device the map gives ``name``: its own entry or its nearest listed ancestor's."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        key = ".".join(parts[:i])
        if key in device_map:
            return device_map[key]
    return None


def main_device(device_map: dict[str, Any]) -> Any:
    """Where inputs go and offloaded layers run: the first GPU in the map, else the CPU."""
    import torch

    gpus = sorted({d.index for d in device_map.values() if d != "disk" and d.type == "cuda"})
    return torch.device("cuda", gpus[0]) if gpus else torch.device("cpu")


def _accelerate_name(d: Any) -> int | str:
    return d if d == "disk" else (d.index if d.type == "cuda" else d.type)


def infer_device_map(
    model: Any, placement: Placement, special_dtypes: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, int] | None]:
    """accelerate's device map for ``model`` (and the memory it balanced), as torch devices."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            f"{param('device_map')} places the model with accelerate",
            hint="pip install 'tiecli[hf]' (or accelerate)",
        ) from None
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    spec = placement.spec
    if isinstance(spec, dict):
        _check_map(model, spec)
        return {k: to_device(v) for k, v in spec.items()}, None
    memory: dict[Any, Any] | None = None
    disk_budget = None
    if placement.max_memory is not None:
        # accelerate leaves disk unbounded (and its balancing cannot parse the key): tiecli
        # holds the model to a disk budget itself
        memory = {k: v for k, v in placement.max_memory.items() if k != "disk"}
        disk_budget = placement.max_memory.get("disk")
    if memory is None and not placement.gpus:
        import psutil  # accelerate's own dependency

        memory = {"cpu": psutil.virtual_memory().available}
    no_split = sorted(getattr(model, "_no_split_modules", None) or [])
    with quiet_accelerate():
        if spec == "sequential":
            balanced = get_max_memory(memory)
        else:
            balanced = get_balanced_memory(
                model,
                max_memory=memory,
                no_split_module_classes=no_split,
                special_dtypes=special_dtypes,
                low_zero=spec == "balanced_low_0",
            )
        try:
            found = infer_auto_device_map(
                model,
                max_memory=dict(balanced),
                no_split_module_classes=no_split,
                special_dtypes=special_dtypes,
            )
        except Exception as e:  # noqa: BLE001 - accelerate's own failure, on this model
            raise LoadFailed(f"accelerate found no placement for the model ({cause(e)})") from e
    device_map = {k: to_device(v) for k, v in found.items()}
    if disk_budget is not None:
        import torch

        on_disk = sum(
            p.numel() * torch.empty((), dtype=special_dtypes.get(n, p.dtype)).element_size()
            for n, p in model.named_parameters()
            if device_of(n, device_map) == "disk"
        )
        if on_disk > disk_budget:
            raise UsageError(
                f"{param('max_memory')} disk={disk_budget}: the placement puts {on_disk} bytes "
                f"of weights on disk; allow more memory on a GPU, the CPU or disk"
            )
    used = {str(k): int(v) for k, v in balanced.items()}
    if disk_budget is not None:
        used["disk"] = disk_budget
    return device_map, used


def _check_map(model: Any, device_map: dict[str, Any]) -> None:
    """A map the user wrote names modules the model has and gives every tensor a device."""
    modules = dict(model.named_modules())
    tensors = list(model.state_dict())
    unknown = [k for k in device_map if k and k not in modules and k not in tensors]
    if unknown:
        raise UsageError(
            f"{param('device_map')} names {', '.join(unknown[:4])}, which "
            f"{type(model).__name__} does not have"
        )
    bare = [n for n in tensors if device_of(n, device_map) is None]
    if bare:
        more = f" and {len(bare) - 4} more" if len(bare) > 4 else ""
        raise UsageError(f"{param('device_map')} gives no device to {', '.join(bare[:4])}{more}")


@contextmanager
def quiet_accelerate() -> Iterator[None]:
    """accelerate's warnings (offloaded parameters on meta, and so on) stay off stderr."""
    import logging

    logger = logging.getLogger("accelerate")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def offload(t: Any, folder: Path, number: int) -> dict[str, str]:
    """Write one tensor to the offload folder as accelerate's offload index reads it back.

    A safetensors file of its own whose data starts on a page, so the weight
    mapped back for the forward pass is aligned as a fresh allocation is.
    """
    import torch

    from ..dtypes import TORCH_TO_CODE

    name = str(t.dtype).removeprefix("torch.")
    nbytes = t.numel() * t.element_size()
    header = json.dumps(
        {"w": {"dtype": TORCH_TO_CODE[name], "shape": list(t.shape), "data_offsets": [0, nbytes]}},
        separators=(",", ":"),
    ).encode()
    # the data starts on a page: mapped back, it is aligned as a copy is
    header += b" " * (-(8 + len(header)) % PAGE)
    path = folder / f"{number:07d}.safetensors"
    data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        f.write(memoryview(data))
    return {"safetensors_file": str(path), "weight_name": "w", "dtype": name}


def dispatch(
    model: Any,
    device_map: dict[str, Any],
    main: Any,
    offload_dir: Path | None,
    index: dict[str, dict[str, str]],
) -> list[str]:
    """Put the loaded ``model`` in place, hooks and all; the modules it offloads (to disk,
    or to the CPU beside a GPU)."""
    import torch
    from accelerate import dispatch_model

    disk = any(d == "disk" for d in device_map.values())
    with quiet_accelerate():
        dispatch_model(
            model,
            device_map={k: _accelerate_name(v) for k, v in device_map.items()},
            main_device=_accelerate_name(main),
            offload_dir=str(offload_dir) if disk else None,
            offload_index=index if disk else None,
            skip_keys=getattr(model, "_skip_keys_device_placement", None),
        )
    cpu = torch.device("cpu")
    return sorted(k for k, d in device_map.items() if d == "disk" or (d == cpu and main != cpu))
