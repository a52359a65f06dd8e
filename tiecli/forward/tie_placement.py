"""Ties on the devices: the ties a loaded model must keep, that a placement keeps each on one
device, and whether each is one weight there once loaded."""

from __future__ import annotations

from typing import Any

from ..errors import UsageError, param
from ..ties import Problem, Tie, Transform
from .dispatch import device_of, main_device
from .homes import home


def wanted(ties: list[Tie], extra: dict[str, str]) -> dict[str, tuple[str, Transform]]:
    """``{alias: (source, transform)}``: every recorded or declared tie the model must keep."""
    out = {t.alias: (t.source, t.transform) for t in ties if t.kind == "tied" and t.drift is None}
    for alias, source in extra.items():
        out.setdefault(alias, (source, "identity"))
    return out


def check_ties_placed(
    wanted: dict[str, tuple[str, Transform]], params: set[str], device_map: dict[str, Any]
) -> None:
    """A tie stays on one device, and a transposed one off disk and off CPU offload.

    accelerate keeps a tie that is one parameter together; a map written by
    hand may not, and a transposed tie is a view accelerate's offload cannot
    keep (its offload index holds whole tensors).
    """
    main = main_device(device_map)
    for alias, (source, how) in sorted(wanted.items()):
        if alias not in params or source not in params:
            continue
        da, ds = device_of(alias, device_map), device_of(source, device_map)
        if da != ds:
            raise UsageError(
                f"{param('device_map')} puts {alias} on {_shown(da)} and {source}, its tie, on "
                f"{_shown(ds)}: a tie must stay on one device"
            )
        if how != "identity" and (da == "disk" or (da.type == "cpu" and main.type != "cpu")):
            raise UsageError(
                f"the placement offloads {alias}, the transposed tie of {source}, to "
                f"{_shown(da)}, where accelerate cannot keep it a view; give it room on a device"
            )


def _shown(d: Any) -> str:
    return d if isinstance(d, str) else str(d)


def ties_on_device(model: Any, ties: list[Tie], extra: dict[str, str]) -> list[Problem]:
    """Every declared or recorded tie must be one storage on the device (or one offloaded weight)."""
    problems = []
    for alias, source, same, place in _tie_homes(model, ties, extra):
        if not same:
            problems.append(
                Problem(
                    "tie-broken-on-device",
                    "error",
                    f"{alias} and {source} are tied but are separate storages on {place}: "
                    f"the loaded model holds two copies that can drift apart",
                    [alias, source],
                )
            )
    return problems


def tie_devices(model: Any, ties: list[Tie], extra: dict[str, str]) -> list[dict[str, Any]]:
    """Where each tie lives: ``{alias, source, device, shared}``; ``disk`` when offloaded there."""
    return [
        {"alias": a, "source": s, "device": place, "shared": same}
        for a, s, same, place in _tie_homes(model, ties, extra)
    ]


def _tie_homes(
    model: Any, ties: list[Tie], extra: dict[str, str]
) -> list[tuple[str, str, bool, str]]:
    """(alias, source, one weight, where the alias's weight is) for each tie the model has."""
    params = dict(model.named_parameters(remove_duplicate=False))
    out = []
    for alias, (source, _) in sorted(wanted(ties, extra).items()):
        a, s = params.get(alias), params.get(source)
        if a is None or s is None:
            continue
        ha, hs = home(model, alias, a), home(model, source, s)
        out.append((alias, source, ha == hs, ha[0]))
    return out
