"""One process per run: a lock file beside the run's checkpoints while it trains.

`ckpt_path=last` started while the same run was still training attached a second process to the
live MLflow run (duplicate metric steps, two models). The lock names the pid, the host and the run;
a heartbeat (its mtime, touched while training) tells a live holder on another host from one that
died without cleaning up. On this host a dead pid frees the lock at once.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from pytorch_lightning.callbacks import Callback

from defect_detection.base import UserError

LOCK_NAME = ".run.lock"
HEARTBEAT_S = 30.0
# a lock from another host whose heartbeat is older than this is taken to be a dead process
STALE_S = 600.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def live_holder(folder: str | Path | None) -> dict | None:
    """The lock's content when a live process holds `folder`'s lock, else None (no lock, or a stale one)."""
    if not folder:
        return None
    path = Path(folder) / LOCK_NAME
    try:
        holder = json.loads(path.read_text())
        age = time.time() - path.stat().st_mtime
    except (OSError, ValueError):
        return None
    if holder.get("host") == socket.gethostname():
        return holder if holder.get("pid") != os.getpid() and _alive(int(holder.get("pid", -1))) else None
    return {**holder, "heartbeat_s": round(age)} if age < STALE_S else None


def refuse_if_live(folder: str | Path | None, run_id: str | None, what: str) -> None:
    """UserError when another live process trains in `folder` (the run being resumed, or another
    run writing the same checkpoint folder)."""
    holder = live_holder(folder)
    if holder is None:
        return
    owner = holder.get("run_id") or "an untracked run"
    same = run_id and holder.get("run_id") == run_id
    beat = f", heartbeat {holder['heartbeat_s']} s ago" if "heartbeat_s" in holder else ""
    raise UserError(
        f"{what}: run {owner} is still training in {folder} (pid {holder.get('pid')} on "
        f"{holder.get('host')}{beat}). "
        + ("Wait for it to end, or stop it first (Ctrl-C / kill), then resume."
           if same else "Choose another paths.output_dir, or wait for that run to end."))


class RunLock(Callback):
    """Holds `<checkpoint folder>/.run.lock` from acquire() to release(), touching it while training."""

    def __init__(self, folder: str | Path | None) -> None:
        self.path = Path(folder) / LOCK_NAME if folder else None
        self._last = 0.0

    def acquire(self, run_id: str | None) -> None:
        if self.path is None:
            return
        refuse_if_live(self.path.parent, run_id, "Cannot start")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id,
                                   "started": time.time()}))
        os.replace(tmp, self.path)
        self._last = time.monotonic()

    def release(self) -> None:
        if self.path is None:
            return
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def _beat(self) -> None:
        if self.path is not None and time.monotonic() - self._last > HEARTBEAT_S:
            self._last = time.monotonic()
            try:
                os.utime(self.path)
            except OSError:
                pass

    def on_train_batch_end(self, *args, **kwargs) -> None:
        self._beat()

    def on_validation_batch_end(self, *args, **kwargs) -> None:
        self._beat()
