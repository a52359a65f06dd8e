"""tiecli's own table of known tie names (``data/tie_patterns.json``).

Used when the architecture cannot be asked (no transformers, no config, or a
model type transformers does not know). A pattern only proposes a pair and
names its source; detection decides from the values whether it is a tie.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..lean import dataclass

TABLE = Path(__file__).parent.parent / "data" / "tie_patterns.json"


@dataclass(frozen=True)
class PatternTie:
    """A tie the pattern table declares for an architecture."""

    alias: str
    source: str
    from_config: bool  # the config's model_type and flags select this rule
    when: str = "always"  # the config flag that switches this tie on, or "always"


@lru_cache(maxsize=1)
def table() -> dict[str, Any]:
    with open(TABLE, encoding="utf-8") as f:
        return json.load(f)


def flags(
    config: dict[str, Any] | None, flag: str, nested: Iterable[str] | None = None
) -> dict[str, bool]:
    """Each value of ``flag`` the config carries: top-level, then in each nested text
    sub-config ``nested`` names (by default the table's: ``text_config``, ``decoder``,
    ``generator``, where transformers looks for the text model), keyed ``flag`` /
    ``<sub>.<flag>``. Other sub-configs (``vision_config``) carry the flag only as a
    serialised default."""
    cfg = config or {}
    out: dict[str, bool] = {}
    if isinstance(cfg.get(flag), bool):
        out[flag] = cfg[flag]
    for key in table()["nested_configs"] if nested is None else nested:
        sub = cfg.get(key)
        if isinstance(sub, dict) and isinstance(sub.get(flag), bool):
            out[f"{key}.{flag}"] = sub[flag]
    return out


def tie_flags() -> dict[str, bool]:
    """The config flags that switch ties on or off (the ``when`` of the table's rules),
    each with its default when neither the config nor its model_type says."""
    return {str(k): bool(v) for k, v in table()["defaults"].items()}


def flag_value(config: dict[str, Any] | None, flag: str) -> bool:
    """The flag as transformers 5 reads it: on when any level that carries it says so
    (a vision-language config's top level takes ``text_config``'s flag), else the
    default of the config's model_type (``model_type_defaults``), else the table's."""
    values = flags(config, flag)
    if values:
        return any(values.values())
    model_type = model_type_of(config)
    own = table()["model_type_defaults"].get(model_type, {}) if model_type else {}
    if isinstance(own.get(flag), bool):
        return bool(own[flag])
    return bool(tie_flags().get(flag, True))


def model_type_of(config: dict[str, Any] | None) -> str | None:
    """The config's model_type the table knows; a composite model's nested text
    model type when the top level is unknown (llava: its ``text_config`` llama)."""
    cfg = config or {}
    known = table()["model_types"]
    candidates = [cfg.get("model_type")]
    candidates += [
        sub.get("model_type")
        for sub in (cfg.get(key) for key in table()["nested_configs"])
        if isinstance(sub, dict)
    ]
    for mt in candidates:
        if isinstance(mt, str) and mt in known:
            return mt
    return None


def _class_rules(config: dict[str, Any] | None) -> list[dict[str, str]] | None:
    """The rules of the class config.json's ``architectures`` names, where the table gives
    that class of the config's model_type rules of its own (``architectures``)."""
    model_type = model_type_of(config)
    classes: dict[str, Any] = table().get("architectures", {}).get(model_type or "", {})
    names = (config or {}).get("architectures")
    for name in names if isinstance(names, list) else []:
        if isinstance(name, str) and name in classes:
            rules: list[dict[str, str]] = classes[name]
            return rules
    return None


def _config_rules(config: dict[str, Any] | None) -> list[dict[str, str]] | None:
    """The rules of the config's class, else of its model_type.

    Classes of one model_type may name their ties differently in the file (a
    masked-LM head beside a causal-LM one): the table lists, per model type, the
    classes whose ties differ from the model type's own."""
    rules = _class_rules(config)
    if rules is not None:
        return rules
    model_type = model_type_of(config)
    return table()["model_types"].get(model_type) if model_type is not None else None


Rule = tuple[str, str, str]  # (alias, source, when)


def rules_for(config: dict[str, Any] | None) -> tuple[list[Rule], bool]:
    """The (alias, source, when) rules that apply, and whether the config chose them."""
    rules = _config_rules(config)
    if rules is not None:
        chosen = []
        for rule in rules:
            flag = rule["when"]
            if flag == "always" or flag_value(config, flag):
                chosen.append((rule["alias"], rule["source"], flag))
        return chosen, True
    when: dict[tuple[str, str], str] = {}
    for r in _every_rule():  # the first rule naming a pair gives its flag
        when.setdefault((r["alias"], r["source"]), r.get("when", "always"))
    return [(a, s, w) for (a, s), w in when.items()], False


def _every_rule() -> list[dict[str, str]]:
    """Every rule of the table: model types', then classes', then the common ones."""
    t = table()
    every = [r for rs in t["model_types"].values() for r in rs]
    every += [r for cs in t.get("architectures", {}).values() for rs in cs.values() for r in rs]
    return every + t["common"]


def governing_flag(alias: str) -> str | None:
    """The config flag that switches a tie of ``alias`` on or off (``tie_word_embeddings``
    for an output head), matched at any '.'-boundary suffix; None: always tied."""
    heads = _flag_aliases()
    start = 0
    while True:
        if alias[start:] in heads:
            return heads[alias[start:]]
        dot = alias.find(".", start)
        if dot < 0:
            return None
        start = dot + 1


@lru_cache(maxsize=1)
def _flag_aliases() -> dict[str, str]:
    return {r["alias"]: r["when"] for r in _every_rule() if r.get("when", "always") != "always"}


def flag_pairs(names: Iterable[str], config: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The pairs of the config's architecture that a flag governs, whatever the flag
    says, with at least one name present: what a consumer resolves by its flag."""
    return [(p.alias, p.source) for p in _governed(names, config)]


def switched_off(names: Iterable[str], config: dict[str, Any] | None) -> list[PatternTie]:
    """The pairs of :func:`flag_pairs` whose flag (``when``) the config turns off."""
    return [p for p in _governed(names, config) if not flag_value(config, p.when)]


def _governed(names: Iterable[str], config: dict[str, Any] | None) -> list[PatternTie]:
    chosen = _config_rules(config)
    if chosen is None:
        return []
    rules = [(r["alias"], r["source"], r["when"]) for r in chosen if r["when"] != "always"]
    return _match(names, rules, True)


def pattern_ties(names: Iterable[str], config: dict[str, Any] | None) -> list[PatternTie]:
    """Pattern pairs present in ``names``, matched at any '.'-boundary prefix.

    Without a config both names must be present (the values then decide); with
    a config that selects the rule, one present name is enough.
    """
    rules, from_config = rules_for(config)
    return _match(names, rules, from_config)


def _match(names: Iterable[str], rules: list[Rule], from_config: bool) -> list[PatternTie]:
    wanted = {n for rule in rules for n in rule[:2]}
    present = set(names)
    prefixes: dict[str, set[str]] = {}
    # a name ends with a wanted suffix only if its last two components (its last, for
    # a one-component suffix) are that suffix's: most names are passed over at once
    tails = {".".join(w.split(".")[-2:]) for w in wanted}
    for name in present:
        cut = name.rfind(".", 0, max(0, name.rfind(".")))
        if name[cut + 1 :] not in tails and name[name.rfind(".") + 1 :] not in tails:
            continue
        start = 0
        while True:
            suffix = name[start:]
            if suffix in wanted:
                prefixes.setdefault(suffix, set()).add(name[:start])
            dot = name.find(".", start)
            if dot < 0:
                break
            start = dot + 1
    # rules sharing a name form a group (T5's three aliases of shared.weight); with a
    # config, one stored member at a prefix brings in the whole group there
    group = {n: n for n in wanted}

    def find(n: str) -> str:
        while group[n] != n:
            group[n] = group[group[n]]
            n = group[n]
        return n

    for alias, source, _ in rules:
        group[find(alias)] = find(source)
    at: dict[str, set[str]] = {}
    for n, ps in prefixes.items():
        at.setdefault(find(n), set()).update(ps)
    found: list[PatternTie] = []
    for alias, source, when in rules:
        for prefix in sorted(at.get(find(alias), set())):
            a, s = prefix + alias, prefix + source
            has_a, has_s = a in present, s in present
            if (has_a and has_s) or from_config:  # a member is stored at this prefix
                found.append(PatternTie(a, s, from_config, when))
    return found
