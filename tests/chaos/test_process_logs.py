"""Logs of server and worker processes when they go to a file (systemd, batch jobs, tests).

Operators grep these files for image ids and times: each record must be one line
that starts with its date, time and level, however long the message.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.processes import ManagedProcess, child_env, trapline_command
from trapline.queue.embedded import free_port

pytestmark = pytest.mark.chaos

RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


async def test_worker_cli_logs_to_a_file_as_whole_timestamped_lines(
    tmp_path: Path, refused_port: int
) -> None:
    """``trapline worker`` with its output in a file (no terminal), as under systemd.

    Bug: src/trapline/cli/worker_cmd.py configures Rich logging even when stderr
    is not a terminal, so a file gets Rich's console layout: records wrapped at
    80 columns, the time alone (no date) and only when it changed, no level
    prefix on continuation lines.
    """
    dead = f"http://127.0.0.1:{refused_port}"  # nothing listens: the worker warns and retries
    env = child_env()
    env.pop("COLUMNS", None)  # as under systemd or a batch scheduler
    worker = ManagedProcess(
        name="worker-logs",
        argv=[
            *trapline_command(),
            "worker",
            "--server",
            dead,
            "--token",
            "t",
            "--pipeline",
            "null",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        env=env,
        log_path=tmp_path / "worker.log",
    )
    worker.start()
    try:
        await worker.wait_for_log(r"retrying", 30)
    finally:
        worker.terminate()
        await worker.wait(30)
    lines = [ln for ln in worker.log_text().splitlines() if not ln.startswith("==== start")]
    assert lines
    unparsable = [ln for ln in lines if not RECORD.match(ln)]
    assert unparsable == [], "log records that are not one timestamped line:\n" + "\n".join(
        unparsable
    )
    assert any(dead in ln and "retrying" in ln for ln in lines)


async def test_server_cli_logs_to_a_file_as_whole_timestamped_lines(
    tmp_path: Path, refused_port: int
) -> None:
    """The server already does this right (Rich only on a terminal): the reference."""
    server = ManagedProcess(
        name="server-logs",
        argv=[*trapline_command(), "server", "--port", str(free_port())],
        env=child_env(
            {
                "TRAPLINE_DATA_DIR": tmp_path / "data",
                # Nothing listens there: start-up fails with a long one-line error.
                "TRAPLINE_NATS_URL": f"nats://127.0.0.1:{refused_port}",
                "TRAPLINE_NATS_CONNECT_TIMEOUT_S": 1,
            }
        ),
        log_path=tmp_path / "server.log",
    )
    server.start()
    await server.wait(60)
    lines = [ln for ln in server.log_text().splitlines() if not ln.startswith("==== start")]
    records = [ln for ln in lines if RECORD.match(ln)]
    assert records
    assert all(RECORD.match(ln) for ln in lines if ln and not ln[0].isspace()), lines
