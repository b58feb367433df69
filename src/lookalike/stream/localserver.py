"""A throw-away local NATS JetStream server, for tests and benchmarks (never for production).

Starts Debian's ``nats-server`` (``apt-get install nats-server``) with JetStream, listening on
a free loopback port, keeping its store in a given folder, with ``max_payload`` raised to
8 MiB so that photos fit in one message.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from ..errors import LookalikeError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalNatsServer:
    """``nats-server -js`` on 127.0.0.1:<free port>, store in ``folder/js``, log in
    ``folder/nats.log``. :meth:`stop` then :meth:`start` restarts it on the same port and store.

    Raises:
        LookalikeError: ``nats-server`` is not installed, or did not start within 20 s.
    """

    def __init__(self, folder: str | Path, max_payload_mb: int = 8) -> None:
        self.binary = shutil.which("nats-server")
        if self.binary is None:
            raise LookalikeError("nats-server is not installed (apt-get install nats-server)")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = self.folder / "nats.conf"
        self.conf.write_text(
            f'listen: "127.0.0.1:{self.port}"\nmax_payload: {max_payload_mb}MB\n'
            f'jetstream {{ store_dir: "{self.folder / "js"}" }}\n'
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:<port>``."""
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> LocalNatsServer:
        """Start the server and wait (at most 20 s) until it accepts connections.

        Raises:
            LookalikeError: the server did not start (its log is named).
        """
        assert self.binary is not None
        with open(self.folder / "nats.log", "ab") as logf:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=logf
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise LookalikeError(f"nats-server did not start; see {self.folder / 'nats.log'}")

    def stop(self) -> None:
        """Stop the server (SIGTERM: JetStream flushes its store)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)

    def __enter__(self) -> LocalNatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
