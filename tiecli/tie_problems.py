"""The problems found ties show: copies that drift or pad, ties not read whole,
absent aliases no loader restores, and absent sources.

Messages name the tensors and the command or flag that fixes them.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

from .checkpoint import Checkpoint
from .ties import Problem, Tie, declared, problem


def tie_problems(
    ties: list[Tie], ckpt: Checkpoint, architecture: str | None, mismatched: Container[str]
) -> list[Problem]:
    """The problems of ``ties`` found in ``ckpt``, tie by tie.

    ``architecture``: whose declared ties a loader restores (None: no config says);
    ``mismatched``: aliases a ``config-mismatch`` problem already names."""
    problems = []
    for t in ties:
        if (
            architecture is not None
            and t.alias not in ckpt.entries
            and t.source_stored
            and t.alias not in mismatched
            and not declared(t)
        ):
            problems.append(
                problem(
                    "alias-not-declared",
                    f"{t.alias} is absent, recorded as {t.source}, but {architecture} "
                    f"does not tie them: transformers will initialise {t.alias} randomly "
                    f"on load; fix: tiecli untie {ckpt.shown}"
                    + (" -o LOCAL_FOLDER" if ckpt.url is not None else ""),
                    [t.alias, t.source],
                )
            )
        if t.unconfirmed:
            problems.append(
                problem(
                    "unconfirmed",
                    f"{t.alias} and {t.source} agree at their sampled elements but were not "
                    f"compared whole: reading them would pass the --max-download budget; "
                    f"raise --max-download to confirm the tie",
                    [t.alias, t.source],
                )
            )
        if t.pad is not None:
            problems.append(_padded(t, ckpt))
        elif t.drift is not None:
            d = t.drift
            diff = (
                f"max abs diff {d.max_abs_diff:g}"
                if d.max_abs_diff is not None
                else "shapes or dtypes differ"
            )
            if d.sampled:
                diff += " among sampled elements (over --max-download, not read whole)"
            problems.append(
                problem(
                    "drift",
                    f"{t.alias} and {t.source} are tied ({', '.join(t.evidence)}) but differ: "
                    f"{diff}, {d.differing} of {d.numel} elements; pick the right copy and re-tie "
                    f"(dedupe keeps both until they agree)",
                    [t.alias, t.source],
                )
            )
        if not t.source_stored and t.stored and t.kind == "tied":
            problems.append(
                problem(
                    "source-missing",
                    f"source {t.source} is absent while its alias {t.alias} is stored: some "
                    f"transformers versions load {t.source} randomly initialised; run "
                    f"'tiecli untie' to store it",
                    [t.source, t.alias],
                )
            )
    return problems


def _padded(t: Tie, ckpt: Checkpoint) -> Problem:
    p = t.pad
    assert p is not None
    how = (
        f"are tied ({', '.join(t.evidence)})"
        if t.kind == "tied"
        else "are untied by config.json, yet one is the other"
    )
    return problem(
        "padded",
        f"{t.alias} ({p.alias_rows} rows) and {t.source} ({p.source_rows} rows) "
        f"{how} with a padded vocabulary: the "
        f"first {min(p.alias_rows, p.source_rows)} rows are bit-identical; "
        f"most consumers refuse the mismatched shapes, so trim the padding to "
        f"the config's vocab_size or pad both"
        + (
            f" (tiecli fix {ckpt.shown} {_padding_flag(t, ckpt.config)})"
            if ckpt.url is None and ckpt.config is not None
            else ""
        ),
        [t.alias, t.source],
    )


def _padding_flag(t: Tie, config: dict[str, Any]) -> str:
    """The fix for a padded pair: ``--tie`` drops a head that is the embedding's first rows
    where config.json ties it and counts the padding in vocab_size (the model it
    describes); otherwise ``--trim-padding`` cuts the longer one to the shorter."""
    from .agreement import vocab_sizes  # the sizes fix weighs (only for a padded pair)

    p = t.pad
    assert p is not None
    counted = list(vocab_sizes(config).values())
    if (
        t.kind == "tied"
        and p.source_rows > p.alias_rows
        and counted
        and all(s == p.source_rows for s in counted)
    ):
        return "--tie"
    return "--trim-padding"
