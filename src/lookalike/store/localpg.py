"""A throw-away local PostgreSQL cluster, for tests and benchmarks (never for production).

``initdb`` a cluster in a folder, start it with ``pg_ctl`` on a free loopback port (and a Unix
socket in the folder), trust authentication for local connections. When run as root (CI
machines), the server runs as the ``postgres`` user that Debian's package creates, since
PostgreSQL refuses to run as root. Binaries come from ``apt-get install postgresql``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ..errors import LookalikeError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if not found:
        raise LookalikeError(f"{name} not found: install PostgreSQL (apt-get install postgresql)")
    return found


class LocalPostgres:
    """A PostgreSQL cluster in ``folder`` on 127.0.0.1:<free port>.

    Raises:
        LookalikeError: PostgreSQL is not installed, or the cluster does not start.
    """

    def __init__(self, folder: str | Path) -> None:
        self.as_user = "postgres" if os.geteuid() == 0 else None
        self.folder = Path(folder)
        self.owned = False
        if self.as_user:  # the postgres user must reach the folder: root's temp dirs are 0700
            self.folder = Path(tempfile.mkdtemp(prefix="lookalike-pg-", dir="/tmp"))
            self.owned = True
        self.data = self.folder / "data"
        self.port = free_port()

    def _run(self, *args: str) -> None:
        cmd = list(args)
        if self.as_user:
            cmd = ["runuser", "-u", self.as_user, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise LookalikeError(f"{' '.join(args[:2])} failed: {proc.stderr.strip()[-500:]}")

    def start(self) -> LocalPostgres:
        """initdb (first time) and start the server; returns self."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.as_user:
            pw = pwd.getpwnam(self.as_user)
            os.chown(self.folder, pw.pw_uid, pw.pw_gid)
        if not (self.data / "PG_VERSION").exists():
            self._run(
                _binary("initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            )
        opts = (
            f"-p {self.port} -h 127.0.0.1 -k {self.folder} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            _binary("pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.folder / "pg.log"),
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "start",
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                import psycopg

                with psycopg.connect(self.url("postgres"), connect_timeout=2):
                    return self
            except Exception:
                time.sleep(0.1)
        raise LookalikeError(f"PostgreSQL did not start; see {self.folder / 'pg.log'}")

    def url(self, database: str = "postgres") -> str:
        """``postgresql://postgres@127.0.0.1:<port>/<database>``."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create a database; returns its URL."""
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (fast shutdown); a folder made for the postgres user is removed."""
        if (self.data / "postmaster.pid").exists():
            self._run(_binary("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        if self.owned:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
