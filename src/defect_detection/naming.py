"""Names a user gives that become parts of file paths (a category, a defect type): refused when
they could leave their folder, and made safe where they are written; and file names that are not
valid UTF-8, shown and refused without a crash.

`data.category=/some/existing/x` once overwrote `/some/existing/x.png` (the category's sample
grid) and `data.category=../../X` wrote outside the output folder: a name is one path component.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from defect_detection.base import UserError

_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]")
ALLOWED = "one folder-name-like word: no '/', '\\', control characters, and not '.' or '..'"


def name_problem(value: object) -> str | None:
    """Why `value` cannot be one path component, or None when it can."""
    text = str(value)
    if not text.strip():
        return "it is empty"
    if text in (".", ".."):
        return f"'{text}' names a folder, not a file"
    if _UNSAFE.search(text):
        return "it holds a path separator or a control character"
    if text != text.strip():
        return "it starts or ends with white space"
    return None


def check_name(value: object, key: str) -> str:
    """`value` as a string, or a UserError naming `key` and the rule."""
    problem = name_problem(value)
    if problem:
        raise UserError(f"{key}={value!r} cannot be used: it becomes part of file names and {problem}. "
                        f"Use {ALLOWED}.")
    return str(value)


def file_safe(name: object) -> str:
    """`name` as one safe path component (where a name is written: defence in depth)."""
    text = _UNSAFE.sub("_", str(name)).strip() or "_"
    return "_" if text in (".", "..") else text


def printable(path: object) -> str:
    """A path as text that prints and writes to UTF-8 files: a file name that is not valid UTF-8
    (Python keeps its bytes as surrogates) shows them as \\xNN instead of failing the write."""
    text = str(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")


def utf8_problem(path: object) -> str | None:
    """Why a file name cannot be used (not valid UTF-8), or None when it can."""
    shown = printable(path)
    if shown == str(path):
        return None
    return (f"its file name is not valid UTF-8 (shown as {Path(shown).name}); rename the file "
            "with UTF-8 characters")
