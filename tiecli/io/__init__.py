"""Byte I/O: files read by position, tensors' byte ranges in them, and positioned
writes and kernel copies. Knows no file format."""

from .blobs import FileBlob, RangeBlob
from .files import OPEN, ByteFile, OpenFiles, fill, open_input, open_limit
from .writes import COPY_STEP, PAD_FROM, PAGE, copy_range, start_writeback, write_all

__all__ = [
    "COPY_STEP",
    "OPEN",
    "PAD_FROM",
    "PAGE",
    "ByteFile",
    "FileBlob",
    "OpenFiles",
    "RangeBlob",
    "copy_range",
    "fill",
    "open_input",
    "open_limit",
    "start_writeback",
    "write_all",
]
