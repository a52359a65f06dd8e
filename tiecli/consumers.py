"""What each consumer (transformers 4 and 5, vLLM, MLX-LM, llama.cpp) loads for the
tensors of a checkpoint's ties, from the rules in ``data/consumers.json``.

The rules are data: for each consumer, how it reads the tie flag (top-level,
nested ``text_config``, or not at all), which file forms it reads, and what it
does in each situation a tie can be in. This module only classifies each tie
into a situation and looks the outcome up; it works on the config dict and the
ties found by detection, never on tensor values, so it needs no torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .arch.patterns import flag_pairs, flags, governing_flag
from .lean import dataclass
from .ties import Problem, Tie

TABLE = Path(__file__).with_name("data") / "consumers.json"
FLAG = "tie_word_embeddings"
OUTCOMES = ("stored", "source", "random", "uninitialized", "refuses")
BAD = frozenset({"random", "uninitialized", "refuses"})
# When one tensor is in several ties, the worst outcome is what the consumer does.
_WORSE = {o: i for i, o in enumerate(OUTCOMES)}


@lru_cache(maxsize=1)
def table() -> dict[str, Any]:
    with open(TABLE, encoding="utf-8") as f:
        return json.load(f)


def rules() -> list[dict[str, Any]]:
    return list(table()["consumers"])


# -- the config's flags ---------------------------------------------------------


def tied_by(flag: dict[str, Any], config: dict[str, Any] | None) -> bool | None:
    """Whether a consumer reading its flag as ``flag`` says tied (None: it reads none)."""
    how = flag["read"]
    default = bool(flag.get("default", True))
    cfg = config or {}
    if how == "ignored":
        return None
    if how == "nested-first":
        for name in flag.get("nested", []):
            sub = cfg.get(name)
            if isinstance(sub, dict):
                value = sub.get(FLAG)
                return value if isinstance(value, bool) else default
        value = cfg.get(FLAG)
        return value if isinstance(value, bool) else default
    if how == "any":
        values = list(flags(cfg, FLAG, flag.get("nested", [])).values())
        return any(values) if values else default
    raise ValueError(f"consumers.json: unknown flag reading {how!r}")


# -- the ties to judge ----------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """A tie as consumers see it: which of its tensors the file holds, and how they compare."""

    alias: str
    source: str
    alias_stored: bool
    source_stored: bool
    equal: bool  # both stored and bit-identical (up to the tie's transform)
    padded: bool = False
    governed: bool = True  # a config flag decides whether the tie is on
    # padded, and the config's vocab_size is below the source's rows: the model is built
    # smaller than the embedding the file holds
    short_vocab: bool = False

    @property
    def situation(self) -> str:
        if self.padded:
            return "padded"
        if not self.alias_stored:
            return "alias_absent"
        if not self.source_stored:
            return "source_absent"
        return "both_equal" if self.equal else "both_differ"

    @property
    def rule(self) -> str:
        """The consumers.json situation whose outcomes apply (a padded tie splits by vocab_size)."""
        return "padded_short_vocab" if self.padded and self.short_vocab else self.situation


def pairs_of(
    ties: Sequence[Tie], names: Iterable[str], config: dict[str, Any] | None
) -> list[Pair]:
    """Every tie a consumer resolves: detected ties, plus the flag-governed pairs of the
    config's architecture that detection did not tie (an untied head, a missing one)."""
    present = set(names)
    out: list[Pair] = []
    seen: set[tuple[str, str]] = set()
    for t in ties:
        if t.kind != "tied" and governing_flag(t.alias) is None:
            continue  # a coincidental duplicate: every consumer loads what is stored
        if t.alias not in present and t.source not in present:
            continue  # judged through the group's stored member
        out.append(
            Pair(
                t.alias,
                t.source,
                t.alias in present,
                t.source in present,
                t.drift is None and t.pad is None,
                padded=t.pad is not None,
                governed=governing_flag(t.alias) is not None,
                short_vocab=t.pad is not None and _vocab_below(config, t.pad.source_rows),
            )
        )
        seen.add((t.alias, t.source))
    tied_names = {n for t in ties for n in (t.alias, t.source)}
    for alias, source in flag_pairs(present, config):
        if (alias, source) in seen or alias in tied_names:
            continue
        a, s = alias in present, source in present
        if not (a or s):
            continue
        out.append(Pair(alias, source, a, s, False))
    return out


def _vocab_below(config: dict[str, Any] | None, rows: int) -> bool:
    """Whether the config's vocab_size (the text model's, where nested) is below ``rows``."""
    cfg = config or {}
    text = cfg.get("text_config")
    vocab = text.get("vocab_size") if isinstance(text, dict) else None
    if vocab is None:
        vocab = cfg.get("vocab_size")
    return isinstance(vocab, int) and not isinstance(vocab, bool) and vocab < rows


# -- outcomes -------------------------------------------------------------------


@dataclass
class ConsumerLoad:
    """What one consumer (transformers, vLLM, MLX-LM, llama.cpp) loads under each name."""

    name: str
    versions: str
    loads: dict[str, str]  # tensor -> outcome
    notes: list[str] = field(default_factory=list)
    source: list[dict[str, str]] = field(default_factory=list)
    applies: bool = True  # False: the consumer reads none of this checkpoint's files
    tied: bool | None = None  # the tie flag as this consumer reads it (None: ignored)

    @property
    def refuses(self) -> bool:
        return any(o == "refuses" for o in self.loads.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": self.versions,
            "loads": dict(self.loads),
            "notes": list(self.notes),
            "source": [_cite(s) for s in self.source],
            "applies": self.applies,
            "tied": self.tied,
        }


def _cite(s: dict[str, str]) -> str:
    ref = f"@{s['ref']}" if s.get("ref") else ""
    return f"{s['repo']}{ref}:{s['path']} ({s.get('symbol', '')})".replace(" ()", "")


def _rule_for(rule: dict[str, Any], situation: str, tied: bool | None) -> dict[str, Any]:
    spec = rule["situations"].get(situation, {})
    if "tied" in spec or "untied" in spec:
        spec = spec["tied" if tied is not False else "untied"]
    return dict(spec)


def _outcome(value: Any, form: str) -> str:
    if isinstance(value, dict):
        value = value.get(form, value.get("safetensors"))
    if value not in OUTCOMES:
        raise ValueError(f"consumers.json: unknown outcome {value!r}")
    return str(value)


def _unserved(rule: dict[str, Any], config: dict[str, Any] | None) -> str | None:
    """The config's model class when the consumer serves no model of that class (an
    inference server loads text generators: a masked-LM head or an encoder-decoder
    wrapper it has no implementation for is not its concern); None when it may."""
    pattern = rule.get("serves")
    classes = (config or {}).get("architectures")
    if not pattern or not isinstance(classes, list) or not classes:
        return None
    first = classes[0]
    if not isinstance(first, str) or re.search(pattern, first):
        return None
    return first


def _form(fmt: str) -> str:
    from .formats import form_named

    return form_named(fmt).loaded_as


def evaluate(
    pairs: Sequence[Pair],
    config: dict[str, Any] | None,
    fmt: str,
    consumers: Sequence[dict[str, Any]] | None = None,
) -> list[ConsumerLoad]:
    """What each consumer loads for every tensor of ``pairs``."""
    form = _form(fmt)
    out = []
    for rule in rules() if consumers is None else consumers:
        tied = tied_by(rule["flag"], config)
        load = ConsumerLoad(
            rule["name"], rule["versions"], {}, source=list(rule["source"]), tied=tied
        )
        out.append(load)
        if form not in rule["reads"]:
            load.applies = False
            load.notes.append(f"reads only {', '.join(rule['reads'])} checkpoints")
            continue
        unserved = _unserved(rule, config)
        if unserved:
            load.applies = False
            load.notes.append(f"serves no {unserved} (a generative model class only)")
            continue
        refused = False
        for p in pairs:
            default_alias = "stored" if p.alias_stored else "source"
            default_source = "stored" if p.source_stored else "source"
            if not p.governed:
                _put(load.loads, p.alias, default_alias)
                _put(load.loads, p.source, default_source)
                continue
            spec = _rule_for(rule, p.rule, tied)
            note = spec.get("note")
            if note and note not in load.notes:
                load.notes.append(str(note))
            if spec.get("refuses"):
                refused = True
            _put(load.loads, p.alias, _outcome(spec.get("alias", default_alias), form))
            _put(load.loads, p.source, _outcome(spec.get("source", default_source), form))
        if refused:
            load.loads = dict.fromkeys(load.loads, "refuses")
    return out


def _put(loads: dict[str, str], name: str, outcome: str) -> None:
    old = loads.get(name)
    if old is None or _WORSE[outcome] > _WORSE[old]:
        loads[name] = outcome


# -- judging ----------------------------------------------------------------------


class _Classes:
    """Tensors holding the same values: members of one tie whose copies are equal."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, n: str) -> str:
        while self.parent.get(n, n) != n:
            n = self.parent[n]
        return n

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def _classes(pairs: Sequence[Pair]) -> _Classes:
    c = _Classes()
    for p in pairs:
        if not p.padded and (p.equal or not (p.alias_stored and p.source_stored)):
            # equal copies, or one name standing for the other's values
            c.union(p.alias, p.source)
    return c


def _partners(pairs: Sequence[Pair]) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in pairs:
        out.setdefault(p.alias, p.source)
        out.setdefault(p.source, p.alias)
    return out


WHAT = {
    "random": "initialise {t} randomly",
    "uninitialized": "leave {t} uninitialised (memory as allocated)",
    "refuses": "refuse to load",
}


def judge(pairs: Sequence[Pair], loads: Sequence[ConsumerLoad]) -> list[Problem]:
    """``consumer-bad-load`` for each consumer that would use random or uninitialised
    weights or refuse the file; ``consumers-disagree`` for each tensor that two
    consumers would load with different values."""
    problems: list[Problem] = []
    active = [c for c in loads if c.applies]
    partner = _partners(pairs)
    classes = _classes(pairs)
    stored = {p.alias for p in pairs if p.alias_stored} | {
        p.source for p in pairs if p.source_stored
    }
    for c in active:
        bad = [t for t, o in c.loads.items() if o in BAD]
        if not bad:
            continue
        if c.refuses:
            why = "; ".join(c.notes) or "the load fails"
            message = f"{c.name} ({c.versions}) would refuse to load this checkpoint: {why}"
        else:
            parts = [WHAT[c.loads[t]].format(t=t) for t in bad]
            message = f"{c.name} ({c.versions}) would {', '.join(parts)}"
            if c.notes:
                message += f" ({'; '.join(c.notes)})"
        related = sorted({*bad, *(partner[t] for t in bad if t in partner)})
        problems.append(Problem("consumer-bad-load", "error", message, related))
    tensors = list(dict.fromkeys(t for c in active for t in c.loads))
    for t in tensors:
        groups: dict[Any, list[str]] = {}
        label: dict[Any, str] = {}
        for c in active:
            o = c.loads.get(t)
            if o is None or o == "refuses":
                continue
            if o in ("stored", "source"):
                other = partner.get(t, t)
                key: Any = classes.find(t if o == "stored" else other)
                if o == "stored" or (key == classes.find(t) and t in stored):
                    label.setdefault(key, "the stored tensor")
                else:
                    label.setdefault(key, f"the values of {other}")
            else:
                key = (o, c.name)
                label[key] = f"{o} values"
            groups.setdefault(key, []).append(c.name)
        if len(groups) < 2:
            continue
        said = "; ".join(f"{label[k]} in {', '.join(names)}" for k, names in groups.items())
        involved = sorted({t, *([partner[t]] if t in partner else [])})
        problems.append(
            Problem(
                "consumers-disagree",
                "error",
                f"consumers would load different values for {t}: {said}; make the config's "
                f"tie flags and the stored tensors describe one model",
                involved,
            )
        )
    return problems


def predict(
    ties: Sequence[Tie],
    names: Iterable[str],
    config: dict[str, Any] | None,
    fmt: str,
    consumers: Sequence[dict[str, Any]] | None = None,
) -> tuple[list[ConsumerLoad], list[Problem]]:
    """Each consumer's loads and the problems they make, for an opened checkpoint.

    Without a config.json there is nothing to predict: every consumer needs one."""
    if config is None:
        return [], []
    pairs = pairs_of(ties, names, config)
    loads = evaluate(pairs, config, fmt, consumers)
    return loads, judge(pairs, loads)
