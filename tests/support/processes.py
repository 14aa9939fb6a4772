"""The server and workers as real subprocesses, for tests that kill, stop and restart them.

- :class:`ServerProcess`: ``trapline server`` with its settings in ``TRAPLINE_*``
  variables (database, NATS, data dir, lease, max deliver, reconcile interval),
  started on a fixed port so it can be restarted at the same address;
  :meth:`ServerProcess.start_and_wait` waits until this process listens and
  ``/healthz`` answers 200. The port is picked free and released before the child
  binds it, so another program may take it first: the child then fails to bind,
  which is detected, and a first start moves to another free port (a restart cannot
  move: it fails naming the port).
- :class:`WorkerProcess`: ``trapline worker`` (or ``python -m tests.chaos.worker_main``
  for test pipelines) with its flags.
- Every process writes stdout and stderr to its own log file (appended across
  restarts); :meth:`ManagedProcess.log_text` reads it, :meth:`wait_for_log` polls it.
- :class:`Processes` tracks what a test started and stops it all at the end, each
  process by its own pid: SIGTERM, then SIGKILL if it does not exit in time.

Environment: the child gets this process's environment without any ``TRAPLINE_*``
or ``AMI_*`` variable, plus what the helper sets, so a developer's settings never
leak into a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.servers import make_tokens
from trapline.queue.embedded import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(sys.executable).parent


def trapline_command() -> list[str]:
    """``trapline`` of this virtual environment (the console script), else ``-m``."""
    script = BIN_DIR / "trapline"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "trapline.cli.main"]


def child_env(extra: Mapping[str, object] | None = None) -> dict[str, str]:
    """This environment without TRAPLINE_*/AMI_* variables, plus ``extra`` (as strings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAPLINE_", "AMI_"))}
    env["PYTHONUNBUFFERED"] = "1"
    # Rich (worker CLI logging) wraps at the terminal width; keep log lines whole.
    env["COLUMNS"] = "1000"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    for key, value in (extra or {}).items():
        env[key] = str(value)
    return env


@dataclass
class ManagedProcess:
    """One child process with its log file; restartable."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    cwd: Path = REPO_ROOT
    proc: subprocess.Popen[bytes] | None = None
    started_at: float | None = None  # time.time() of the last start
    starts: int = 0

    def start(self) -> None:
        if self.alive:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"==== start #{self.starts + 1}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # our signals only, never the terminal's
            )
        self.started_at = time.time()
        self.starts += 1

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def send(self, sig: signal.Signals) -> float:
        """Send ``sig`` to this process (by pid); the wall-clock time it was sent."""
        assert self.proc is not None
        at = time.time()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return at

    def terminate(self) -> float:
        return self.send(signal.SIGTERM)

    def kill(self) -> float:
        return self.send(signal.SIGKILL)

    async def wait(self, limit_s: float) -> int:
        """Wait for the exit; its code. TimeoutError (process left running) after ``limit_s``."""
        assert self.proc is not None
        deadline = time.monotonic() + limit_s
        while True:
            code = self.proc.poll()
            if code is not None:
                return code
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{self.name} (pid {self.pid}) still running after {limit_s:g} s; log tail:\n"
                    + self.log_tail()
                )
            await asyncio.sleep(0.05)

    def stop_sync(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait, then SIGKILL: for cleanup. The exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    async def stop(self, limit_s: float = 15.0) -> int | None:
        """Like :meth:`stop_sync` without blocking the event loop."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.terminate()
            try:
                return await self.wait(limit_s)
            except TimeoutError:
                self.kill()
                return await self.wait(10)
        return self.proc.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_of_this_start(self) -> str:
        """The log written since the latest start (its "==== start #N" line on)."""
        text = self.log_text()
        at = text.rfind(f"==== start #{self.starts}:")
        return text[at:] if at >= 0 else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_lines(self, pattern: str) -> list[str]:
        regex = re.compile(pattern)
        return [ln for ln in self.log_text().splitlines() if regex.search(ln)]

    async def wait_for_log(self, pattern: str, limit_s: float) -> str:
        """The first log line matching ``pattern``, polling until ``limit_s``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + limit_s
        while True:
            for line in self.log_text().splitlines():
                if regex.search(line):
                    return line
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{self.name}: no log line matching {pattern!r} in {limit_s:g} s; tail:\n"
                    + self.log_tail()
                )
            await asyncio.sleep(0.1)


class PortTaken(RuntimeError):
    """The server could not bind its port: another program holds it."""


_BIND_ATTEMPTS = 5


@dataclass
class ServerProcess(ManagedProcess):
    """``trapline server`` on ``port``; tokens created on its database beforehand."""

    port: int = 0
    admin_token: str = ""
    worker_token: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start_and_wait(self, limit_s: float = 60.0) -> None:
        """Start and wait until this process listens and ``/healthz`` answers 200.

        A first start whose port was taken meanwhile moves to another free port; a
        restart keeps its address (workers know it), so there it is an error.
        """
        may_move = self.starts == 0
        for attempt in range(1, _BIND_ATTEMPTS + 1):
            self.start()
            try:
                await self.wait_healthy(limit_s)
                return
            except PortTaken:
                if not may_move or attempt == _BIND_ATTEMPTS:
                    raise
            self._move_to(free_port())

    def _move_to(self, port: int) -> None:
        at = self.argv.index("--port")
        self.argv[at + 1] = str(port)
        self.port = port

    async def wait_healthy(self, limit_s: float = 60.0) -> None:
        """Healthy once *this* process has logged that it listens (so a program that
        took the port is never mistaken for it) and ``/healthz`` answers 200."""
        listening = f"Uvicorn running on {self.url} "
        deadline = time.monotonic() + limit_s
        async with httpx.AsyncClient(base_url=self.url, timeout=2.0) as http:
            while True:
                if not self.alive:
                    if "address already in use" in self.log_of_this_start():
                        raise PortTaken(
                            f"{self.name}: port {self.port} is taken by another program"
                        )
                    raise RuntimeError(
                        f"{self.name} exited with code {self.returncode} at start; log tail:\n"
                        + self.log_tail()
                    )
                if listening in self.log_of_this_start():
                    with contextlib.suppress(httpx.HTTPError):
                        if (await http.get("/healthz")).status_code == 200:
                            return
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"{self.name} not healthy after {limit_s:g} s; log tail:\n"
                        + self.log_tail()
                    )
                await asyncio.sleep(0.1)

    async def restart(self, limit_s: float = 60.0) -> None:
        await self.stop()
        await self.start_and_wait(limit_s)

    def client(self, token: str | None = None, **headers: str) -> httpx.AsyncClient:
        key = token or self.admin_token
        return httpx.AsyncClient(
            base_url=self.url, headers={"Authorization": f"Token {key}", **headers}, timeout=30
        )


@dataclass
class WorkerProcess(ManagedProcess):
    """A worker subprocess; ``service_name`` identifies it in the ledger's holder column."""

    service_name: str = ""
    state_dir: Path = field(default_factory=Path)

    def holds(self, holder: str | None) -> bool:
        """Whether a ledger ``holder`` value (``service@host``) is this worker."""
        return bool(holder) and str(holder).startswith(f"{self.service_name}@")


class Processes:
    """The processes one test started; :meth:`stop_all` ends each of them by pid."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[ManagedProcess] = []

    async def server(
        self,
        *,
        database_url: str,
        nats_url: str,
        ack_wait_s: float = 30.0,
        max_deliver: int = 3,
        reconcile_interval_s: float = 0.2,
        queue_check_interval_s: float | None = None,
        name: str = "server",
        extra_env: Mapping[str, object] | None = None,
        start: bool = True,
    ) -> ServerProcess:
        """``trapline server`` on a free port with these settings, healthy when returned.

        The queue check runs every 10 sweeps unless ``queue_check_interval_s`` says
        otherwise (the cadence these tests were written for).
        """
        admin, worker = await make_tokens(database_url)
        port = free_port()
        env = child_env(
            {
                "TRAPLINE_DATABASE_URL": database_url,
                "TRAPLINE_NATS_URL": nats_url,
                "TRAPLINE_DATA_DIR": self.root / name / "data",
                "TRAPLINE_ACK_WAIT_S": ack_wait_s,
                "TRAPLINE_MAX_DELIVER": max_deliver,
                "TRAPLINE_RECONCILE_INTERVAL_S": reconcile_interval_s,
                "TRAPLINE_QUEUE_CHECK_INTERVAL_S": (
                    10 * reconcile_interval_s
                    if queue_check_interval_s is None
                    else queue_check_interval_s
                ),
                "TRAPLINE_LOG_LEVEL": "INFO",
                **(extra_env or {}),
            }
        )
        server = ServerProcess(
            name=name,
            argv=[*trapline_command(), "server", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            log_path=self.root / f"{name}.log",
            port=port,
            admin_token=admin,
            worker_token=worker,
        )
        self.started.append(server)
        if start:
            await server.start_and_wait()
        return server

    def worker(
        self,
        *,
        server_url: str,
        token: str,
        name: str,
        pipeline: str = "null",
        batch_size: int = 16,
        drain: bool = False,
        state_dir: Path | None = None,
        test_pipeline: bool = False,
        compute_s: float = 0.0,
        fail_ids: Sequence[str] = (),
        extra_env: Mapping[str, object] | None = None,
        extra_args: Sequence[str] = (),
        start: bool = True,
    ) -> WorkerProcess:
        """A worker subprocess: ``trapline worker`` or, with ``test_pipeline``, the test runner.

        Defaults for a fast test: poll every 0.2 s. ``extra_env`` sets any other
        ``TRAPLINE_*`` worker setting (e.g. ``TRAPLINE_HTTP_TIMEOUT_S``).
        """
        state = state_dir or self.root / name / "state"
        args = [
            "--server",
            server_url,
            "--token",
            token,
            "--pipeline",
            pipeline,
            "--batch-size",
            str(batch_size),
            "--state-dir",
            str(state),
            "--service-name",
            name,
        ]
        if drain:
            args.append("--drain")
        if test_pipeline:
            argv = [sys.executable, "-m", "tests.chaos.worker_main", *args]
            argv += ["--compute-s", str(compute_s), "--fail-ids", ",".join(fail_ids)]
        else:
            if compute_s or fail_ids:
                raise ValueError("compute_s and fail_ids need test_pipeline=True")
            argv = [*trapline_command(), "worker", *args, "--log-level", "INFO"]
        env = child_env(
            {"TRAPLINE_POLL_INTERVAL_S": 0.2, "TRAPLINE_LOG_LEVEL": "INFO", **(extra_env or {})}
        )
        worker = WorkerProcess(
            name=name,
            argv=[*argv, *extra_args],
            env=env,
            log_path=self.root / f"{name}.log",
            service_name=name,
            state_dir=state,
        )
        self.started.append(worker)
        if start:
            worker.start()
        return worker

    async def stop_all(self) -> None:
        # Workers first (they may still deliver), then servers.
        ordered = sorted(self.started, key=lambda p: isinstance(p, ServerProcess))
        for proc in ordered:
            await proc.stop()

    def describe(self) -> dict[str, Any]:
        """Name -> pid and log file of every process started."""
        return {
            p.name: {"pid": p.proc.pid if p.proc else None, "log": str(p.log_path)}
            for p in self.started
        }
