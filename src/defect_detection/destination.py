"""Check that an output file can be written before the work that produces it starts.

`defect-predict output=<a folder>` scored every image, then failed with a raw traceback and lost
every score; export had the same check for its `-o` already. Both call this one.
"""

from __future__ import annotations

import os
from pathlib import Path

from defect_detection.base import UserError


def check_destination(out: Path, label: str | None = None, what: str = "file",
                      probe: Path | None = None) -> None:
    """UserError unless `out` can be written: its folder is created, a probe file written and
    removed (`probe`: that file, else a hidden one beside `out`). `label`: how the user named it
    (default `output=<out>`); `what`: the kind of file, for the folder case."""
    out = Path(out)
    label = label or f"output={out}"
    if out.is_dir():
        raise UserError(f"{label} is a folder: name the {what} to write.")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"{label}: {blocker} is a file, not a folder; choose another output path.")
    probe = probe or out.with_name(f".{out.name}.{os.getpid()}.probe")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"{label} cannot be written ({err.strerror or type(err).__name__}: "
                        f"{err.filename or out.parent}); choose a writable output path.") from None
