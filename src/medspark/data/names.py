"""File names as text, losslessly: what Parquet, CSV files and MLflow get for a path, and the way back.

A POSIX file name is bytes. Python lists it as str with each byte that is not UTF-8 as a lone surrogate (PEP 383,
`scan_\\udcff.png`), which every UTF-8 writer refuses (pyarrow, csv files, MLflow, a UTF-8 log file). `to_text`
writes such a byte as `\\xNN` and a backslash as `\\\\`; everything else is kept as it is, newlines and any valid
Unicode included, so a UTF-8 name without a backslash (nearly all) is written unchanged. `from_text` undoes it
exactly: from_text(to_text(p)) == p for every path os.listdir can return, and os.fsencode of it is the file
name's bytes. A `path` column or CSV cell of medspark is this text.
"""
from __future__ import annotations

import os
import re

_ESCAPED = re.compile(r"\\(\\|x[0-9a-fA-F]{2})")


def to_text(path: str) -> str:
    """A path as UTF-8-safe text (see the module's docstring)."""
    if "\\" not in path:
        try:
            path.encode("utf-8")
            return path
        except UnicodeEncodeError:
            pass
    return os.fsencode(path.replace("\\", "\\\\")).decode("utf-8", "backslashreplace")


def from_text(text: str) -> str:
    """The path `to_text` wrote (text it did not write, a stray backslash included, comes back as it is)."""
    if "\\" not in text:
        return text
    out, pos = bytearray(), 0
    for m in _ESCAPED.finditer(text):
        out += text[pos:m.start()].encode("utf-8", "surrogateescape")
        out += b"\\" if m.group(1) == "\\" else bytes([int(m.group(1)[1:], 16)])
        pos = m.end()
    out += text[pos:].encode("utf-8", "surrogateescape")
    return os.fsdecode(bytes(out))
