"""Rebuilding a model from a checkpoint and proving it with a forward pass.

The model comes from ``config.json`` through transformers (built on the meta
device, so no time goes to random init) or from a ``module:function`` the user
names (:mod:`.build`). Weights are loaded with ties restored (:mod:`.load`),
placed on the device so that every tie is one storage there (:mod:`.tie_placement`),
and the model runs on a seeded input (:mod:`.inputs`). Against a reference
checkpoint the outputs must be bit-identical, or within ``atol`` (:mod:`.check`).

A model larger than one device is placed across GPUs, the CPU and disk by
accelerate (``infer_auto_device_map``, ``dispatch_model``), as transformers'
``device_map="auto"`` places it (:mod:`.placement`, :mod:`.dispatch`); weights
are read tensor by tensor straight to their device or to a temporary offload
folder.
"""

from .build import build_model
from .check import DTYPES, float_outputs, forward_check, run_forward
from .devices import resolve_device
from .inputs import example_input, token_ids
from .load import load_onto
from .placement import (
    DEVICE_MAPS,
    Placement,
    parse_device_map,
    parse_max_memory,
    parse_size,
    placement_for,
)
from .result import ForwardReport, RunStats
from .tie_placement import tie_devices, ties_on_device

__all__ = [
    "DEVICE_MAPS",
    "DTYPES",
    "ForwardReport",
    "Placement",
    "RunStats",
    "build_model",
    "example_input",
    "float_outputs",
    "forward_check",
    "load_onto",
    "parse_device_map",
    "parse_max_memory",
    "parse_size",
    "placement_for",
    "resolve_device",
    "run_forward",
    "tie_devices",
    "ties_on_device",
    "token_ids",
]
