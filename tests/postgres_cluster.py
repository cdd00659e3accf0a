"""A throwaway PostgreSQL cluster for tests: the system's initdb/pg_ctl, a temp dir, 127.0.0.1.

The MLflow tracking-server test runs against PostgreSQL whenever the binaries are on PATH, so CI
(a clean clone on a machine with the PostgreSQL packages) exercises the backend a team server uses
without anything installed or running beforehand. PostgreSQL refuses to run as root: as root the
cluster runs as the `postgres` system user, in a directory under /tmp that user can reach.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

START_TIMEOUT_S = 60
SUPERUSER = "mlflow"


class ClusterUnavailable(RuntimeError):
    """The cluster could not be created or started here; the message says why (a skip reason)."""


@dataclass
class Cluster:
    uri: str
    timings: dict[str, float] = field(default_factory=dict)  # seconds: initdb, start, createdb


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _os_user() -> str | None:
    """Who runs the cluster: this process, or `postgres` when this process is root (None: nobody)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        raise ClusterUnavailable("running as root and there is no `postgres` system user to run "
                                 "PostgreSQL as (it refuses root)") from None


def _run(cmd: list[str], user: str | None, cwd: str, timeout: float) -> None:
    try:
        proc = subprocess.run(cmd, user=user, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise ClusterUnavailable(f"{cmd[0]} did not finish in {timeout:.0f}s") from err
    if proc.returncode != 0:
        raise ClusterUnavailable(f"{' '.join(cmd[:2])} failed ({proc.returncode}): "
                                 f"{(proc.stderr or proc.stdout).strip()[-1500:]}")


@contextmanager
def postgres_cluster(database: str = "mlflow") -> Iterator[Cluster]:
    """Create, start and yield a cluster with an empty `database`; always stopped and removed.

    Raises ClusterUnavailable (before yielding) when the binaries, psycopg, or the start fail.
    """
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        raise ClusterUnavailable("initdb/pg_ctl are not on PATH (install the PostgreSQL server package)")
    try:
        import psycopg
    except ImportError:
        raise ClusterUnavailable("psycopg is not installed: pip install -e '.[dev]'") from None
    user = _os_user()
    base = tempfile.mkdtemp(prefix="defect-pg-")  # short path: the unix socket name has a length limit
    data, log, port = os.path.join(base, "data"), os.path.join(base, "server.log"), _free_port()
    if user:
        shutil.chown(base, user=user)
    started = False
    try:
        timings: dict[str, float] = {}
        try:
            t0 = time.monotonic()
            _run([initdb, "-D", data, "-A", "trust", "-U", SUPERUSER, "-E", "UTF8", "--locale=C",
                  "--no-sync"], user, base, START_TIMEOUT_S)
            timings["initdb"] = time.monotonic() - t0
            t0 = time.monotonic()
            started = True  # from here on, stop it whatever happens
            _run([pg_ctl, "-D", data, "-l", log, "-w", "-t", str(START_TIMEOUT_S),
                  "-o", f"-h 127.0.0.1 -p {port} -k {base} -F", "start"], user, base, START_TIMEOUT_S + 10)
            timings["start"] = time.monotonic() - t0
            t0 = time.monotonic()
            with psycopg.connect(host="127.0.0.1", port=port, user=SUPERUSER, dbname="postgres",
                                 autocommit=True, connect_timeout=10) as conn:
                conn.execute(f'CREATE DATABASE "{database}"')
            timings["createdb"] = time.monotonic() - t0
        except (ClusterUnavailable, psycopg.Error) as err:
            log_tail = open(log).read()[-1500:] if os.path.exists(log) else ""
            raise ClusterUnavailable(f"{err}\n{log_tail}".strip()) from err
        yield Cluster(f"postgresql://{SUPERUSER}@127.0.0.1:{port}/{database}", timings)
    finally:
        if started:
            try:
                subprocess.run([pg_ctl, "-D", data, "stop", "-m", "fast", "-t", "30"], user=user, cwd=base,
                               capture_output=True, timeout=40)
            except subprocess.TimeoutExpired:
                pass  # a postmaster whose data dir is gone shuts itself down (lock file check)
        shutil.rmtree(base, ignore_errors=True)
