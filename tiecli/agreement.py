"""What makes every consumer load one model: ``fix``'s decision.

Transformers 4 and 5, vLLM, MLX-LM and llama.cpp resolve a tie between the
input embedding and the output head each by its own rule (``consumers.py``).
Where their rules part, ``fix`` changes the checkpoint until they meet, on the
model its stored tensors describe: the config's tie flags are made to say what
the tensors are (untied for a head that differs from the embedding; the same
at every level that carries the flag), a missing embedding is stored as a copy
of the head, and, when asked, a padded embedding is cut to the vocabulary.
Where the tensors cannot say which model was meant (an untied config, no head)
it refuses and names the parameter that chooses.
"""

from __future__ import annotations

import copy
from dataclasses import field
from typing import Any

from .arch.patterns import flags
from .arch.patterns import table as pattern_table
from .checkpoint import Checkpoint
from .consumers import FLAG, Pair, pairs_of, rules, tied_by
from .errors import UnsafeChangeError, UsageError, param
from .lean import dataclass
from .ties import TieReport

TIE, UNTIE_HEAD, TRIM_PADDING = param("tie"), param("untie_head"), param("trim_padding")


def nested_configs() -> list[str]:
    """The sub-configs any consumer reads the tie flag in (``text_config``...)."""
    names = [n for r in rules() for n in r["flag"].get("nested", [])]
    return list(dict.fromkeys([*names, *pattern_table()["nested_configs"]]))


@dataclass
class ConfigEdit:
    """One change ``fix`` makes to the config's tie flag, at one level of it."""

    key: str  # "tie_word_embeddings" or "text_config.tie_word_embeddings"
    before: bool | None  # None: the level did not carry the flag
    after: bool

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "from": self.before, "to": self.after}


@dataclass
class Resolution:
    """What ``fix`` does about one tie the config's flag governs."""

    alias: str
    source: str
    situation: str  # as consumers.json names it: both_equal, both_differ, ...
    action: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "alias": self.alias,
            "source": self.source,
            "situation": self.situation,
            "action": self.action,
        }


@dataclass
class Decision:
    """What ``fix`` does: the flag it sets, the tensors it stores, trims or drops."""

    target: bool | None  # what every level of the config's flag is to say (None: as it is)
    copies: list[tuple[str, str]]  # (name to store, tensor whose bytes it takes)
    trims: dict[str, int]  # name -> rows kept
    resolutions: list[Resolution]
    dropped: list[str] = field(default_factory=list)  # names left out of the files


def _readings(cfg: dict[str, Any]) -> set[bool]:
    """The tie flag as each consumer that reads one reads it."""
    out = {tied_by(r["flag"], cfg) for r in rules()}
    return {v for v in out if v is not None}


def vocab_sizes(cfg: dict[str, Any]) -> dict[str, int]:
    """Each ``vocab_size`` the config carries: top-level and in the text sub-configs a
    consumer reads (``text_config``...), keyed as :func:`~tiecli.arch.patterns.flags` keys."""
    out: dict[str, int] = {}
    if isinstance(cfg.get("vocab_size"), int):
        out["vocab_size"] = cfg["vocab_size"]
    for key in nested_configs():
        sub = cfg.get(key)
        if isinstance(sub, dict) and isinstance(sub.get("vocab_size"), int):
            out[f"{key}.vocab_size"] = sub["vocab_size"]
    return out


def decide(
    ckpt: Checkpoint, report: TieReport, tie: bool, untie_head: bool, trim_padding: bool
) -> Decision:
    """What makes every consumer load one model, from the config and the governed
    pairs; refuses (UsageError, exit 2) where only the user can say which model."""
    cfg = ckpt.config or {}
    shown = ckpt.path
    readings = _readings(cfg)
    mixed = len(readings) > 1 or len(set(flags(cfg, FLAG, nested_configs()).values())) > 1
    said = None if mixed else (readings.pop() if readings else True)
    # the flag a pair any flag serves gets: the one asked for, else the config's
    chosen = False if untie_head else (True if tie or said is None else said)
    pairs = [p for p in pairs_of(report.ties, ckpt.entries, cfg) if p.governed]
    targets: dict[bool, list[Pair]] = {True: [], False: []}
    copies: list[tuple[str, str]] = []
    trims: dict[str, int] = {}
    dropped: list[str] = []
    resolutions: list[Resolution] = []

    def want(p: Pair, value: bool) -> None:
        targets[value].append(p)

    for p in pairs:
        situation = p.situation
        if situation == "padded":
            long, short, rows = _padding(ckpt, p)
            long_rows = ckpt.entries[long].shape[0]
            sizes = vocab_sizes(cfg)
            # the config counts the padding and ties the head: dropping the head (the
            # embedding's first rows) is the model config.json describes
            droppable = (
                long == p.source
                and said is True
                and bool(sizes)
                and all(v == long_rows for v in sizes.values())
            )
            drop_hint = (
                f"pass {TIE} to drop {p.alias} (the first {rows} rows of {p.source}): every "
                f"consumer then uses {p.source} as the head, as config.json's tie flag and "
                f"vocab_size {long_rows} say"
            )
            if droppable and tie and not trim_padding:
                dropped.append(p.alias)
                want(p, True)
                resolutions.append(
                    Resolution(
                        p.alias,
                        p.source,
                        situation,
                        f"drop {p.alias}, the first {rows} rows of {p.source}: every consumer "
                        f"uses {p.source} as the head (config vocab_size {long_rows})",
                    )
                )
                continue
            if not trim_padding:
                trim_hint = (
                    f"pass {TRIM_PADDING} to drop the last {long_rows - rows} rows of {long}"
                )
                raise UsageError(
                    f"{long} has {long_rows} rows and {short} {rows}, the "
                    f"first {rows} bit-identical: a padded vocabulary, which most consumers "
                    "refuse (mismatched shapes) and MLX serves as extra logits; nothing was "
                    "changed",
                    shown,
                    hint=f"{drop_hint}; or make vocab_size {rows} and {trim_hint}"
                    if droppable
                    else trim_hint,
                )
            wrong = {k: v for k, v in sizes.items() if v != rows}
            if not sizes or wrong:
                said_vocab = (
                    ", ".join(f"{k}={v}" for k, v in (wrong or sizes).items()) or "no vocab_size"
                )
                raise UnsafeChangeError(
                    f"{TRIM_PADDING} would cut {long} to {rows} rows (those of {short}) but "
                    f"config.json says {said_vocab}, not {rows}; nothing was changed",
                    shown,
                    hint="make config.json's vocab_size the vocabulary's size first"
                    + (f", or {drop_hint}" if droppable else ""),
                )
            trims[long] = rows
            want(p, chosen)
            resolutions.append(
                Resolution(
                    p.alias,
                    p.source,
                    situation,
                    f"trim {long} to its first {rows} rows (config vocab_size {rows})",
                )
            )
        elif situation == "both_differ":
            if tie:
                raise UsageError(
                    f"{TIE} would make every consumer use {p.source} as the head, but "
                    f"{p.alias} is stored and differs from it (a head trained untied): "
                    "loading it tied would drop it; nothing was changed",
                    shown,
                    hint=f"leave out {TIE}: fix makes the config say untied",
                )
            want(p, False)
            action = "config says untied: every consumer uses the stored head"
            if said is False:
                action = "nothing: the config says untied, every consumer uses the stored head"
            resolutions.append(Resolution(p.alias, p.source, situation, action))
        elif situation == "source_absent":
            if said is False and not tie:
                raise UsageError(
                    f"config.json says {FLAG}=false but {p.source} is absent, only "
                    f"{p.alias} stored: which embedding was meant cannot be known; "
                    "nothing was changed",
                    shown,
                    hint=f"pass {TIE} to store a copy of {p.alias} as {p.source} and make the "
                    "config say tied",
                )
            copies.append((p.source, p.alias))
            want(p, False if untie_head else True)
            resolutions.append(
                Resolution(p.alias, p.source, situation, f"store {p.source} as a copy of {p.alias}")
            )
        elif situation == "alias_absent":
            if untie_head:
                copies.append((p.alias, p.source))
                want(p, False)
                action = f"store {p.alias} as a copy of {p.source}; config says untied"
            elif tie or said is None:
                want(p, True)
                action = f"config says tied: every consumer uses {p.source} as {p.alias}"
            elif said:
                action = "nothing: every consumer uses the embedding as the head"
            else:
                raise UsageError(
                    f"config.json says {FLAG}=false but {p.alias} is absent: transformers "
                    "initialises it randomly, vLLM leaves it uninitialised, MLX refuses and "
                    f"llama.cpp uses {p.source}; which model was meant cannot be known; "
                    "nothing was changed",
                    shown,
                    hint=f"pass {TIE} to make the config say tied (every consumer uses "
                    f"{p.source} as the head), or {UNTIE_HEAD} to store a copy of {p.source} "
                    f"as {p.alias} (the config stays untied)",
                )
            resolutions.append(Resolution(p.alias, p.source, situation, action))
        else:  # both_equal: any flag loads the same values
            if said is None or tie or untie_head:
                want(p, chosen)
            resolutions.append(
                Resolution(
                    p.alias,
                    p.source,
                    situation,
                    "nothing: the stored copies are equal"
                    if said is not None and chosen == said
                    else f"config says {'tied' if chosen else 'untied'}",
                )
            )
    if targets[True] and targets[False]:
        a, b = targets[True][0], targets[False][0]
        raise UsageError(
            f"{a.alias} needs the config to say tied and {b.alias} untied; nothing was changed",
            shown,
            hint=f"pass {UNTIE_HEAD} to store every absent head, so the config can say untied",
        )
    target = True if targets[True] else False if targets[False] else None
    if target is None and mixed:  # no tensors to judge by: transformers 5's reading
        target = tie or (not untie_head and any(flags(cfg, FLAG, nested_configs()).values()))
    return Decision(target, copies, trims, resolutions, dropped)


def _padding(ckpt: Checkpoint, p: Pair) -> tuple[str, str, int]:
    """(the longer name, the shorter name, the shorter's rows) of a padded pair."""
    a, s = ckpt.entries[p.alias], ckpt.entries[p.source]
    long, short = (p.source, p.alias) if s.shape[0] > a.shape[0] else (p.alias, p.source)
    return long, short, ckpt.entries[short].shape[0]


def config_edits(cfg: dict[str, Any], target: bool | None) -> list[ConfigEdit]:
    """The levels whose flag must change for every consumer to read ``target``: a level
    that says otherwise; for untied, also a level that leaves it to the default (tied)."""
    if target is None:
        return []
    out = []
    levels: list[tuple[str, dict[str, Any]]] = [("", cfg)]
    levels += [(f"{k}.", cfg[k]) for k in nested_configs() if isinstance(cfg.get(k), dict)]
    for prefix, level in levels:
        value = level.get(FLAG)
        has = isinstance(value, bool)
        if (has and value != target) or (not has and target is False):
            out.append(ConfigEdit(prefix + FLAG, value if has else None, target))
    return out


def apply_edits(cfg: dict[str, Any], edits: list[ConfigEdit]) -> dict[str, Any]:
    """``cfg`` with the edits made: an existing key keeps its place, a new one goes last."""
    new = copy.deepcopy(cfg)
    for e in edits:
        *path, key = e.key.split(".")
        level = new
        for part in path:
            level = level[part]
        level[key] = e.after
    return new
