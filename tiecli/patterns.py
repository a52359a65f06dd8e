"""tiecli's own table of known tie names (``data/tie_patterns.json``).

Used when the architecture cannot be asked (no transformers, no config, or a
model type transformers does not know). A pattern only proposes a pair and
names its source; detection decides from the values whether it is a tie.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

TABLE = Path(__file__).with_name("data") / "tie_patterns.json"


@dataclass(frozen=True)
class PatternTie:
    alias: str
    source: str
    from_config: bool  # the config's model_type and flags select this rule


@lru_cache(maxsize=1)
def table() -> dict[str, Any]:
    with open(TABLE, encoding="utf-8") as f:
        return json.load(f)


def rules_for(config: dict[str, Any] | None) -> tuple[list[tuple[str, str]], bool]:
    """The (alias, source) rules that apply, and whether the config chose them."""
    t = table()
    model_type = (config or {}).get("model_type")
    rules = t["model_types"].get(model_type) if isinstance(model_type, str) else None
    if rules is not None:
        assert config is not None
        chosen = []
        for rule in rules:
            flag = rule["when"]
            if flag == "always" or config.get(flag, t["defaults"].get(flag, True)):
                chosen.append((rule["alias"], rule["source"]))
        return chosen, True
    every = [(r["alias"], r["source"]) for rs in t["model_types"].values() for r in rs]
    every += [(r["alias"], r["source"]) for r in t["common"]]
    return list(dict.fromkeys(every)), False


def pattern_ties(names: Iterable[str], config: dict[str, Any] | None) -> list[PatternTie]:
    """Pattern pairs present in ``names``, matched at any '.'-boundary prefix.

    Without a config both names must be present (the values then decide); with
    a config that selects the rule, one present name is enough.
    """
    rules, from_config = rules_for(config)
    wanted = {n for rule in rules for n in rule}
    present = set(names)
    prefixes: dict[str, set[str]] = {}
    for name in present:
        start = 0
        while True:
            suffix = name[start:]
            if suffix in wanted:
                prefixes.setdefault(suffix, set()).add(name[:start])
            dot = name.find(".", start)
            if dot < 0:
                break
            start = dot + 1
    found: list[PatternTie] = []
    for alias, source in rules:
        for prefix in sorted(prefixes.get(alias, set()) | prefixes.get(source, set())):
            a, s = prefix + alias, prefix + source
            has_a, has_s = a in present, s in present
            if (has_a and has_s) or (from_config and (has_a or has_s)):
                found.append(PatternTie(a, s, from_config))
    return found
