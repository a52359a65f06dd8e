"""Result objects as one JSON document on stdout, for machines. Apart from
:mod:`tiecli.render` so that ``--json`` never imports rich (about 20 ms of start-up)."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from .errors import Wording


def print_json(result: Any) -> None:
    sys.stdout.write(
        json.dumps(_finite(result.to_dict()), indent=2, allow_nan=False, default=_json_default)
        + "\n"
    )


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such numbers (a drift involving NaN) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Wording):  # the command line's spelling of a parameter
        return value.as_flags()
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    return str(value)
