"""Which consumer rules a ``--for`` list names: consumers by name or package, each
optionally with version conditions (``transformers<5``, ``transformers>=4.40,<5``)."""

from __future__ import annotations

import re
from typing import Any

from .consumers import rules
from .errors import UsageError, param

FOR = param("for_consumers")  # the CLI's --for

_SPEC = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_.\-]*?)\s*((?:[<>=!]=?|==)\s*[0-9A-Za-z.]+.*)?\s*$")
_CLAUSE = re.compile(r"^\s*(<=|>=|==|<|>)\s*([0-9][0-9A-Za-z.]*)\s*$")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)) or (0,)


def _interval(spec: str) -> tuple[tuple[int, ...] | None, bool, tuple[int, ...] | None, bool]:
    """``>=4.40,<5`` as (low, low inclusive, high, high inclusive); None: unbounded."""
    lo: tuple[int, ...] | None = None
    hi: tuple[int, ...] | None = None
    lo_in = hi_in = True
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        m = _CLAUSE.match(clause)
        if m is None:
            raise UsageError(f"{FOR}: cannot read the version condition {clause!r}")
        op, v = m.group(1), _version(m.group(2))
        if op in (">", ">=", "==") and (lo is None or v > lo or (v == lo and op == ">")):
            lo, lo_in = v, op != ">"
        if op in ("<", "<=", "==") and (hi is None or v < hi or (v == hi and op == "<")):
            hi, hi_in = v, op != "<"
    return lo, lo_in, hi, hi_in


def _overlap(a: str, b: str) -> bool:
    alo, alo_in, ahi, ahi_in = _interval(a)
    blo, blo_in, bhi, bhi_in = _interval(b)

    def below(hi: Any, hi_in: bool, lo: Any, lo_in: bool) -> bool:
        """The interval ending at hi lies wholly below the one starting at lo."""
        if hi is None or lo is None:
            return False
        n = max(len(hi), len(lo))
        hi_p, lo_p = hi + (0,) * (n - len(hi)), lo + (0,) * (n - len(lo))
        return hi_p < lo_p or (hi_p == lo_p and not (hi_in and lo_in))

    return not below(ahi, ahi_in, blo, blo_in) and not below(bhi, bhi_in, alo, alo_in)


def select(spec: str | None) -> list[dict[str, Any]]:
    """The consumer rules ``--for`` names: ``transformers,vllm``, ``transformers<5``,
    ``transformers-4,mlx-lm``. None: every consumer."""
    every = rules()
    if spec is None:
        return every
    chosen: list[dict[str, Any]] = []
    items: list[str] = []
    for piece in (s.strip() for s in spec.split(",")):
        if piece and piece[0] in "<>=!" and items:
            items[-1] += "," + piece  # transformers>=4.40,<5: one item, two conditions
        elif piece:
            items.append(piece)
    for item in items:
        m = _SPEC.match(item)
        if m is None:
            raise UsageError(f"{FOR}: cannot read {item!r}")
        name, cond = m.group(1), (m.group(2) or "").strip()
        found = [r for r in every if name in (r["name"], r["package"])]
        if not found:
            known = ", ".join(sorted({r["name"] for r in every} | {r["package"] for r in every}))
            raise UsageError(f"{FOR}: unknown consumer {name!r}; known: {known}")
        if cond:
            found = [r for r in found if _overlap(r["versions"], cond)]
            if not found:
                raise UsageError(f"{FOR}: no {name} rules cover {cond!r}")
        chosen += [r for r in found if r not in chosen]
    if not chosen:
        raise UsageError(f"{FOR} names no consumer")
    return chosen
