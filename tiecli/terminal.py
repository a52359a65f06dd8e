"""Text from a checkpoint made safe to show on a terminal.

Tensor names, shard and file names, metadata and config values come from files
that may have been made by anyone. Written to a terminal as they are, a name can
set the window title, clear the screen or move the cursor (escape sequences), or,
through rich, restyle or hide the rest of the line (markup). :func:`printable`
spells out every control character instead; the renderer adds rich's markup
escaping on top. JSON output needs neither: ``json.dumps`` escapes them itself.
"""

from __future__ import annotations

import re

# C0 controls, DEL and C1 controls; line and paragraph separators; the bidirectional
# marks, overrides and isolates that can make one name read as another ("Trojan source").
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _spell(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}"


def printable(text: object) -> str:
    """``text`` with each control character written out (``\\x1b``, ``\\u009b``)."""
    return _UNSAFE.sub(_spell, str(text))
