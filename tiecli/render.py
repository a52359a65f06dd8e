"""Rendering result objects for people: rich tables and lines. (One JSON document for
machines: :mod:`tiecli.json_out`, which needs no rich.)"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import Wording
from .terminal import printable


def shown(text: object) -> str:
    """Text from a file (names, paths, messages) as rich prints it literally: control
    characters spelled out, markup escaped."""
    return escape(printable(text))


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def as_flags(text: str) -> str:
    """``text`` as the command line says it: parameters named by their flags."""
    return text.as_flags() if isinstance(text, Wording) else text


def ties_table(ties: list[Any]) -> Table:
    table = Table(title="Ties", title_justify="left", expand=False)
    for col in ("alias", "source", "transform", "kind", "evidence", "stored"):
        table.add_column(col, overflow="fold")
    table.add_column("bytes", justify="right")
    for t in ties:
        stored = "yes" if t.stored else "no"
        if t.pad is not None:
            stored += f" [red](padded: {t.pad.source_rows} vs {t.pad.alias_rows} rows)[/red]"
        elif t.drift is not None:
            stored += " [red](drift)[/red]"
        elif not t.source_stored:
            stored += " [yellow](source absent)[/yellow]"
        elif getattr(t, "unconfirmed", False):
            stored += " [yellow](unconfirmed)[/yellow]"
        table.add_row(
            shown(t.alias),
            shown(t.source),
            t.transform,
            t.kind,
            shown(", ".join(t.evidence)),
            stored,
            human_bytes(t.bytes),
        )
    return table


def problems_table(problems: list[Any]) -> Table:
    table = Table(title="Problems", title_justify="left")
    table.add_column("severity")
    table.add_column("code")
    table.add_column("message", overflow="fold")
    for p in problems:
        color = "red" if p.severity == "error" else "yellow"
        message = shown(p.message)
        for r in p.related:  # consumer findings about the same tensors
            message += f"\n  {shown(r.code)}: {shown(r.message)}"
        table.add_row(f"[{color}]{p.severity}[/{color}]", shown(p.code), message)
    return table


OUTCOME_STYLE = {
    "stored": "green",
    "source": "cyan",
    "random": "red",
    "uninitialized": "red",
    "refuses": "red",
}


def consumers_table(consumers: list[Any]) -> Table:
    """Consumer -> what it loads for each tensor a tie involves."""
    active = [c for c in consumers if c.applies]
    tensors = list(dict.fromkeys(t for c in active for t in c.loads))
    table = Table(title="What each consumer loads", title_justify="left")
    table.add_column("consumer")
    for t in tensors:
        table.add_column(shown(t), overflow="fold")
    table.add_column("notes", overflow="fold")
    for c in consumers:
        cells = []
        for t in tensors:
            o = c.loads.get(t, "")
            style = OUTCOME_STYLE.get(o)
            cells.append(f"[{style}]{o}[/{style}]" if style else shown(o))
        table.add_row(f"{shown(c.name)} {shown(c.versions)}", *cells, shown("; ".join(c.notes)))
    return table


def _about_consumers(p: Any) -> bool:
    return p.code.startswith("consumer") or any(_about_consumers(q) for q in p.related)


def render_consumers(r: Any, console: Console) -> None:
    """A table when consumers would load different models, else one line."""
    active = [c for c in r.consumers if c.applies]
    if not active or not any(c.loads for c in active):
        return
    if r.consumers_agree:
        names = ", ".join(c.name for c in active)
        console.print(f"consumers: all load the same values ({shown(names)})")
        return
    console.print(consumers_table(r.consumers))
    console.print(problems_table(r.consumer_problems))


def render_inspect(r: Any, console: Console) -> None:
    console.print(f"[bold]{shown(r.path)}[/bold]  ({r.format})")
    if r.nested_key:
        console.print(f"state dict under key {shown(repr(r.nested_key))}")
    if r.config:
        console.print(f"config: {shown(r.config)}")
    console.print(f"tensors: {r.tensors}   stored bytes: {human_bytes(r.bytes)} ({r.bytes})")
    if r.declared_by:
        console.print(f"architecture ties from: {shown(r.declared_by)}")
    if r.ties:
        console.print(ties_table(r.ties))
    else:
        console.print("no ties found")
    console.print(
        f"dedupe would save: {human_bytes(r.dedupable_bytes)} ({r.dedupable_bytes} bytes)"
    )
    if r.problems:
        console.print(problems_table(r.problems))
    else:
        console.print("problems: none")
    from .formats import form_named

    if form_named(r.format).architecture_inside:  # what llama.cpp's head rule says, too
        for note in r.notes:
            console.print(f"note: {shown(note)}")
    render_consumers(r, console)
    if r.remote is not None:
        console.print(remote_line(r.remote))


def remote_line(remote: dict[str, int]) -> str:
    """What reading a remote checkpoint cost."""
    return (
        f"remote: {remote['requests']} request(s), "
        f"{human_bytes(remote['bytes_read'])} ({remote['bytes_read']} bytes) read"
    )


def render_dedupe(r: Any, console: Console) -> None:
    verb = "would remove" if r.dry_run else "removed"
    console.print(f"[bold]{shown(r.path)}[/bold]  ({r.format})")
    if r.removed:
        table = Table(title=f"Aliases {verb}", title_justify="left")
        for col in ("alias", "source", "transform", "kind", "bytes"):
            table.add_column(col, overflow="fold", justify="right" if col == "bytes" else "left")
        for t in r.removed:
            table.add_row(
                shown(t.alias), shown(t.source), t.transform, t.kind, human_bytes(t.bytes)
            )
        console.print(table)
    else:
        console.print("nothing to remove")
    if r.kept:
        table = Table(title="Ties left stored", title_justify="left")
        for col in ("alias", "source", "reason"):
            table.add_column(col, overflow="fold")
        for t, reason in r.kept:
            table.add_row(shown(t.alias), shown(t.source), shown(as_flags(reason)))
        console.print(table)
    console.print(
        f"bytes: {human_bytes(r.bytes_before)} -> {human_bytes(r.bytes_after)} "
        f"(saved {human_bytes(r.bytes_saved)}, {r.bytes_saved} bytes)"
    )
    _outcome(r, console, "already deduped, nothing changed")


def _outcome(r: Any, console: Console, unchanged: str) -> None:
    """The last lines of a rewrite: what was written, and any problems."""
    if r.dry_run:
        console.print("dry run: nothing written")
    elif not r.changed:
        console.print(f"{shown(str(r.output))}: {unchanged}")
    else:
        console.print(f"written: {shown(str(r.output))} (verified)")
    if r.problems:
        console.print(problems_table(r.problems))


def render_untie(r: Any, console: Console) -> None:
    console.print(f"[bold]{shown(r.path)}[/bold]  ({r.format})")
    if r.restored:
        table = Table(title="Restored" if not r.dry_run else "Would restore", title_justify="left")
        for col in ("name", "from", "transform", "bytes"):
            table.add_column(col, overflow="fold", justify="right" if col == "bytes" else "left")
        by_name = {n: t for t in r.restored for n in (t.alias, t.source)}
        for made, (origin, transform) in r.made.items():
            t = by_name[made]
            table.add_row(shown(made), shown(origin), transform, human_bytes(t.bytes))
        console.print(table)
    else:
        console.print("nothing to restore: every name is stored")
    console.print(f"bytes: {human_bytes(r.bytes_before)} -> {human_bytes(r.bytes_after)}")
    _outcome(r, console, "nothing changed")


def render_forward(f: Any, console: Console) -> None:
    s = f.stats
    console.print(f"forward: {shown(f.architecture)} on {shown(f.device)} ({shown(f.device_name)})")
    console.print(
        f"  parameters: {s.parameters:,}   on device: {human_bytes(s.unique_bytes)}   "
        f"a tie-unaware load: {human_bytes(s.untied_bytes)}   ties shared on device: "
        f"{'yes' if f.ties_shared_on_device else 'NO'}"
    )
    console.print(
        f"  load {s.load_seconds:.3f} s   forward {s.forward_seconds:.3f} s   "
        f"outputs finite: {'yes' if f.outputs_finite else 'NO'}"
    )
    if s.device_map is not None:
        _render_placement(f, console)
    if f.against is not None:
        same = "bit-identical" if f.max_abs_diff == 0 else f"max abs diff {f.max_abs_diff:g}"
        verdict = "equal" if f.outputs_equal else "DIFFERENT"
        console.print(f"  against {shown(f.against)}: {verdict} ({same})")


def _render_placement(f: Any, console: Console) -> None:
    """Where a --device-map run put the weights, each tie, and the memory it peaked at."""
    s = f.stats
    spread = ", ".join(f"{shown(d)} {human_bytes(n)}" for d, n in s.bytes_by_device.items())
    console.print(f"  placement: {spread or 'nothing placed'}")
    if s.offloaded:
        console.print(
            f"  offloaded: {len(s.offloaded)} module(s), {human_bytes(s.offload_bytes)} written "
            f"to the offload folder"
        )
    for t in f.tie_devices:
        where = t["device"] if isinstance(t["device"], str) else ", ".join(map(str, t["device"]))
        state = "one storage" if t["shared"] else "NOT SHARED"
        console.print(
            f"  tie {shown(t['alias'])} -> {shown(t['source'])}: {shown(where)} ({state})"
        )
    peaks = [f"host {human_bytes(f.peak_host_bytes)}"] + [
        f"{shown(d)} {human_bytes(n)}" for d, n in f.device_peak_bytes.items()
    ]
    console.print(f"  peak memory: {', '.join(peaks)}")


def render_verify(r: Any, console: Console) -> None:
    for c in r.checkpoints:
        tied = sum(1 for t in c.ties if t.kind == "tied")
        console.print(
            f"[bold]{shown(c.path)}[/bold]  ({c.format}): {tied} tie(s), {len(c.problems)} problem(s)"
        )
        if c.problems:
            console.print(problems_table(c.problems))
        if any(_about_consumers(p) for p in c.problems):
            console.print(consumers_table(c.consumers))
        if c.remote is not None:
            console.print("  " + remote_line(c.remote))
    if r.forward is not None:
        render_forward(r.forward, console)
    if r.for_consumers:
        console.print(f"consumers checked: {shown(r.for_consumers)}")
    failing = len(r.failures)
    if r.ok:
        console.print(
            "[green]OK[/green]: ties are consistent" + (" and deduped" if r.require_deduped else "")
        )
    else:
        console.print(
            f"[red]FAILED[/red]: {failing} problem(s)"
            + (" (--strict: warnings count)" if r.strict else "")
        )


def render_fix(r: Any, console: Console) -> None:
    console.print(f"[bold]{shown(r.path)}[/bold]  ({r.format})")
    for res in r.resolutions:
        console.print(
            f"{shown(res.alias)} / {shown(res.source)} ({shown(res.situation)}): {shown(res.action)}"
        )
    if r.config_edits:
        title = f"{'Would edit' if r.dry_run else 'Edited'} {shown(r.config)}"
        table = Table(title=title, title_justify="left")
        for col in ("key", "from", "to"):
            table.add_column(col, overflow="fold")
        for e in r.config_edits:
            before = "absent" if e.before is None else json.dumps(e.before)
            table.add_row(shown(e.key), before, json.dumps(e.after))
        console.print(table)
    if r.tensor_writes:
        table = Table(title="Would write" if r.dry_run else "Written", title_justify="left")
        for col in ("name", "action", "from", "shape", "bytes"):
            table.add_column(col, overflow="fold", justify="right" if col == "bytes" else "left")
        for w in r.tensor_writes:
            table.add_row(
                shown(w.name),
                w.action,
                shown(w.origin),
                "x".join(map(str, w.shape)),
                human_bytes(w.bytes),
            )
        console.print(table)
    for note in r.notes:
        console.print(shown(note))
    if r.dry_run:
        _outcome(r, console, "nothing changed")  # the problems fix would resolve
        return
    if not r.changed:
        console.print(f"{shown(str(r.output))}: nothing changed")
    else:
        console.print(f"written: {shown(str(r.output))} (verified)")
    if r.problems:  # the input's, found before the fix: the result is verify's to judge
        console.print(
            f"problems found before the fix: {len(r.problems)} (tiecli verify checks the result)"
        )
