"""The one exception tree of tiecli.

Every error a user can meet is a :class:`TiecliError`. Each subclass also
inherits the matching builtin, so callers that catch ``ValueError`` or
``OSError`` keep working. The console entry point turns these into a single
``Error: <path>: <what is wrong>`` line and an exit code; nothing else in the
package rewords them.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

# A parameter named inside a message: ``param("max_shard_size")``. Python callers
# read the parameter's name; the command line reads its flag (``--max-shard-size``).
_MARK = "\x0e"  # not whitespace: messages are re-spaced with str.split()
_PARAM = re.compile(_MARK + r"([a-z][a-z0-9_]*)" + _MARK)


def param(name: str) -> str:
    """``name``, a keyword parameter of the Python API, marked for the message it goes into."""
    return f"{_MARK}{name}{_MARK}"


def as_python(name: str) -> str:
    return name


# Parameters whose flag is not ``--`` and the name with dashes.
FLAGS = {"output": "-o", "for_consumers": "--for"}


def as_flag(name: str) -> str:
    """The command-line flag of a parameter: ``max_shard_size`` -> ``--max-shard-size``,
    ``output`` -> ``-o``."""
    return FLAGS.get(name) or "--" + name.replace("_", "-")


def spell(text: str, style: Callable[[str], str] = as_python) -> str:
    """``text`` with every :func:`param` mark written in ``style``."""
    return _PARAM.sub(lambda m: style(m.group(1)), text)


def debugging() -> bool:
    """``--debug`` or ``TIECLI_DEBUG=1``: let exceptions through, tracebacks and all."""
    return os.environ.get("TIECLI_DEBUG", "") not in ("", "0") or "--debug" in sys.argv


class Wording(str):
    """Text kept in a result that names parameters (a reason a tie stays stored).

    It reads with Python names like any ``str``; :meth:`as_flags` gives the
    command line's spelling, which the CLI's tables and JSON print."""

    marked: str

    def __new__(cls, marked: str) -> Wording:
        text = super().__new__(cls, spell(marked))
        text.marked = marked
        return text

    def as_flags(self) -> str:
        return spell(self.marked, as_flag)


class TiecliError(Exception):
    """Base class. ``path`` names the file at fault, ``hint`` the fix."""

    exit_code = 2

    def __init__(
        self, message: str, path: str | os.PathLike[str] | None = None, hint: str | None = None
    ):
        self.message = " ".join(str(message).split())
        self.path = os.fspath(path) if path is not None else None
        self.hint = " ".join(hint.split()) if hint else None
        super().__init__(self.one_line())

    def one_line(self, style: Callable[[str], str] = as_python) -> str:
        """The error on one line, parameters named in ``style`` (:func:`as_flag` for the CLI)."""
        text = f"{self.path}: {self.message}" if self.path else self.message
        if self.hint:
            text += f"; {self.hint}"
        return spell(text, style)


class CheckpointNotFoundError(TiecliError, FileNotFoundError):
    """The path does not exist or holds no weights."""

    def __str__(self) -> str:  # FileNotFoundError would format errno fields
        return self.one_line()


class CheckpointFormatError(TiecliError, ValueError):
    """The checkpoint is unreadable, truncated or inconsistent."""


class UnsafePickleError(CheckpointFormatError):
    """A pickle that needs more than tensors and plain containers to load."""


class TieRecordError(CheckpointFormatError):
    """A tie record (tiecli's own or the ``{alias: source}`` convention) is malformed."""


class OutputError(TiecliError, OSError):
    """The output cannot be written (exists, unwritable, disk full)."""

    def __str__(self) -> str:
        return self.one_line()


class BusyError(OutputError):
    """Another tiecli is rewriting the same checkpoint or output (its lock is held)."""


class RemoteError(TiecliError, OSError):
    """A remote checkpoint cannot be reached or read (network, server, timeout)."""

    def __str__(self) -> str:
        return self.one_line()


class MissingDependencyError(TiecliError, ImportError):
    """An optional dependency is needed for this operation."""


class UsageError(TiecliError, ValueError):
    """Options that contradict each other or the input."""


class UnsafeChangeError(TiecliError, RuntimeError):
    """A requested rewrite would lose or change data; nothing was written."""

    exit_code = 1


class VerificationError(UnsafeChangeError):
    """What was written does not read back as the input; nothing was renamed into place."""


class TieError(TiecliError, ValueError):
    """A live model's ties are broken or drifted (raised by ``check_model``)."""

    exit_code = 1
