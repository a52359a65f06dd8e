"""Functions of the C library that Python's ``os`` module does not offer (``memcmp``,
``fallocate``, ``sync_file_range``), each looked up once and typed."""

from __future__ import annotations

from typing import Any

FOUND: dict[str, Any] = {}  # name -> the typed function, or None where there is none


def c_function(name: str, restype: str, *argtypes: str, also: str | None = None) -> Any:
    """The C library's ``name`` (or ``also`` where ``name`` is missing), its result and
    arguments typed by ctypes names (``"c_int"``...), keeping ``errno`` for
    ``ctypes.get_errno``; None where there is no C library or no such function."""
    if name not in FOUND:
        fn = None
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            fn = getattr(libc, name, None)
            if fn is None and also is not None:
                fn = getattr(libc, also, None)
            if fn is not None:
                fn.restype = getattr(ctypes, restype)
                fn.argtypes = [getattr(ctypes, t) for t in argtypes]
        except OSError:  # no C library to load (not a POSIX system)
            fn = None
        FOUND[name] = fn
    return FOUND[name]
