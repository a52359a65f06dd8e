"""What a forward check reports: its run statistics, the report, and the failures that end
a run as a ``forward-failed`` problem rather than as an error."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from ..lean import dataclass
from ..ties import Problem


@dataclass
class RunStats:
    """Figures of one model's load and forward run: sizes, times, placement, memory."""

    parameters: int = 0
    unique_bytes: int = 0  # parameter bytes on the device, each storage once
    untied_bytes: int = 0  # what a tie-unaware load (one copy per name) would take
    load_seconds: float = 0.0
    forward_seconds: float = 0.0
    shared_ties: int = 0
    # with --device-map: {module: device} as placed, the memory accelerate balanced,
    # the modules whose weights are offloaded (to disk, or to the CPU beside a GPU)
    device_map: dict[str, Any] | None = None
    max_memory: dict[str, int] | None = None
    offloaded: list[str] = field(default_factory=list)
    offload_bytes: int = 0  # written to the offload folder
    bytes_by_device: dict[str, int] = field(default_factory=dict)  # unique parameter bytes
    missing: int = 0  # the model's parameters the checkpoint does not hold


@dataclass
class ForwardReport:
    """``verify --forward``'s result: the run's figures, and the comparison with ``--against``."""

    device: str
    device_name: str
    architecture: str
    stats: RunStats
    outputs_finite: bool
    ties_shared_on_device: bool
    against: str | None = None
    outputs_equal: bool | None = None
    max_abs_diff: float | None = None
    atol: float | None = None
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    tie_devices: list[dict[str, Any]] = field(default_factory=list)
    peak_host_bytes: int = 0  # the process's resident-memory high-water mark
    device_peak_bytes: dict[str, int] = field(default_factory=dict)  # per GPU

    def to_dict(self) -> dict[str, Any]:
        s = self.stats
        device_map = None
        if s.device_map is not None:
            device_map = {k: v if isinstance(v, str) else str(v) for k, v in s.device_map.items()}
        return {
            "device": self.device,
            "device_name": self.device_name,
            "architecture": self.architecture,
            "outputs_equal": self.outputs_equal,
            "max_abs_diff": self.max_abs_diff,
            "atol": self.atol,
            "against": self.against,
            "outputs_finite": self.outputs_finite,
            "ties_shared_on_device": self.ties_shared_on_device,
            "seconds": round(self.seconds, 4),
            "parameters": self.stats.parameters,
            "unique_parameter_bytes": self.stats.unique_bytes,
            "tie_unaware_bytes": self.stats.untied_bytes,
            "shared_ties": self.stats.shared_ties,
            "load_seconds": round(self.stats.load_seconds, 4),
            "forward_seconds": round(self.stats.forward_seconds, 4),
            "device_map": device_map,
            "max_memory": s.max_memory,
            "offloaded": s.offloaded,
            "offload_bytes": s.offload_bytes,
            "bytes_by_device": s.bytes_by_device,
            "tie_devices": self.tie_devices,
            "peak_host_bytes": self.peak_host_bytes,
            "device_peak_bytes": self.device_peak_bytes,
        }


class LoadFailed(Exception):
    """The model could not be loaded or run: the check fails, naming why."""


class BuildFailed(LoadFailed):
    """transformers could not build ``architecture`` from the config."""

    def __init__(self, architecture: str, message: str):
        super().__init__(message)
        self.architecture = architecture


def cause(e: BaseException) -> str:
    """``Type: first line of the message``, for a problem that stays one line."""
    text = " ".join(str(e).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
