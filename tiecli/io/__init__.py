"""Byte I/O: reading and writing files by position."""
