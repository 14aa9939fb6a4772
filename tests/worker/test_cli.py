"""``python -m trapline.worker`` as a real subprocess against the real server: exit codes,
SIGTERM, several processes.

The server runs in this test's event loop, so the tests wait for the worker
processes without blocking it (asyncio subprocesses, bounded polling).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.polling import until
from tests.support.servers import RunningServer
from tests.worker import server_api as api
from tests.worker.server_api import image_list, names

pytestmark = pytest.mark.timeout(120)

REGISTER_PATH = r"^/api/v2/projects/1/pipelines/?$"


def worker_cmd(url: str, token: str, state_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trapline.worker",
        "--server",
        url,
        "--token",
        token,
        "--state-dir",
        str(state_dir),
        *extra,
    ]


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TRAPLINE_", "AMI_"))}
    clean["TRAPLINE_POLL_INTERVAL_S"] = "0.05"
    clean["TRAPLINE_DELIVERY_BACKOFF_CAP_S"] = "0.1"
    return clean


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


@asynccontextmanager
async def started(cmd: list[str]) -> AsyncIterator[asyncio.subprocess.Process]:
    """The worker process for the ``with`` block; killed (by pid) if still running after it."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env()
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def finish(proc: asyncio.subprocess.Process, limit_s: float = 60) -> Finished:
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit_s)
    except TimeoutError:
        raise AssertionError(f"worker process still running after {limit_s:g} s") from None
    assert proc.returncode is not None
    return Finished(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


async def run(cmd: list[str], limit_s: float = 60) -> Finished:
    async with started(cmd) as proc:
        return await finish(proc, limit_s)


async def test_start_errors_are_one_line_and_exit_2(server: RunningServer, tmp_path: Path) -> None:
    job = await api.create_job(server, "null", image_list(["a"]))
    cmd = worker_cmd(server.url, server.worker_token, tmp_path)
    missing = await run(cmd)
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        "error: no pipeline given: pass --pipeline SLUG (see `trapline pipelines`)"
    )
    unknown = await run([*cmd, "--pipeline", "nope"])
    assert unknown.returncode == 2
    assert unknown.stderr.strip().startswith("error: unknown pipeline 'nope'; installed:")
    assert len(unknown.stderr.strip().splitlines()) == 1
    no_file = await run([*cmd, "--pipeline-file", str(tmp_path / "gone.toml")])
    assert no_file.returncode == 2
    assert len(no_file.stderr.strip().splitlines()) == 1 and "gone.toml" in no_file.stderr
    bad_token = await run([*cmd, "--pipeline", "null", "--token", "wrong"])
    assert bad_token.returncode == 2 and "refused the token" in bad_token.stderr
    assert await api.counts(server, job) == {
        "total": 1,
        "queued": 1,
        "reserved": 0,
        "done": 0,
        "failed": 0,
    }


async def test_drain_exits_0_after_delivering_everything(
    server: RunningServer, tmp_path: Path
) -> None:
    job = await api.create_job(server, "null", image_list(names(50)))
    done = await run(
        [
            *worker_cmd(server.url, server.worker_token, tmp_path),
            *("--pipeline", "null", "--drain", "--batch-size", "8"),
        ]
    )
    assert done.returncode == 0, done.stdout + done.stderr
    view = await api.job_view(server, job)
    assert view["status"] == "SUCCESS"
    assert view["counts"] == {"total": 50, "queued": 0, "reserved": 0, "done": 50, "failed": 0}


async def test_sigterm_delivers_or_releases_everything_and_exits_0(
    server: RunningServer, tmp_path: Path
) -> None:
    total = 3000
    job = await api.create_job(server, "null", image_list(names(total)))
    cmd = worker_cmd(server.url, server.worker_token, tmp_path, "--pipeline", "null")
    async with started([*cmd, "--batch-size", "4"]) as proc:

        async def some_done() -> bool:
            return (await api.counts(server, job))["done"] >= 20

        await until(some_done, "the worker to deliver 20 images", limit_s=60, interval_s=0.05)
        proc.send_signal(signal.SIGTERM)
        ended = await finish(proc)
    assert ended.returncode == 0, ended.stderr
    counts = await api.counts(server, job)
    # Nothing is left leased to the stopped worker: each image is done or queued again.
    assert counts["reserved"] == 0 and counts["failed"] == 0
    assert counts["queued"] + counts["done"] == total and counts["done"] < total


async def test_several_processes_share_the_work(server: RunningServer, tmp_path: Path) -> None:
    job = await api.create_job(server, "null", image_list(names(400)))
    done = await run(
        [
            *worker_cmd(server.url, server.worker_token, tmp_path),
            *("--pipeline", "null", "--drain", "--processes", "2"),
        ],
        limit_s=90,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (await api.counts(server, job))["done"] == 400
    assert "[worker 1]" in done.stderr and "[worker 0]" in done.stderr
    # Each process took its own outbox slot.
    assert outbox_files(tmp_path) == {"outbox-0.sqlite3", "outbox-1.sqlite3"}


def outbox_files(state_dir: Path) -> set[str]:
    return {p.name for p in state_dir.glob("outbox-*.sqlite3")}


def child_pids(parent: int) -> list[int]:
    """Worker processes spawned by ``parent`` (not multiprocessing's helper processes)."""
    pids: list[int] = []
    for task in Path(f"/proc/{parent}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except FileNotFoundError:
                continue  # exited between the two reads
            if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
                pids.append(int(pid))
    return pids


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
async def test_a_killed_process_is_restarted_while_its_sibling_goes_on(
    server: RunningServer, proxy_to: Any, tmp_path: Path
) -> None:
    proxy: FaultProxy = proxy_to(server)
    job = await api.create_job(server, "null", image_list(names(2000)))

    def registrations() -> int:
        return proxy.count("forwarded", "POST", REGISTER_PATH)

    cmd = worker_cmd(proxy.url, server.worker_token, tmp_path, "--pipeline", "null")
    async with started([*cmd, "--processes", "2", "--batch-size", "4"]) as proc:
        await until(lambda: len(child_pids(proc.pid)) == 2, "two worker processes", 60)
        await until(lambda: registrations() == 2, "both processes registered", 60)
        victim, sibling = child_pids(proc.pid)
        os.kill(victim, signal.SIGKILL)
        # A third process registers: the replacement; the sibling is untouched.
        await until(lambda: registrations() == 3, "the replacement registered", 60)
        assert sibling in child_pids(proc.pid) and victim not in child_pids(proc.pid)
        proc.send_signal(signal.SIGTERM)
        ended = await finish(proc)
    assert "killed by signal 9" in ended.stderr and "restarting it" in ended.stderr
    assert ended.returncode == 0, ended.stderr
    counts = await api.counts(server, job)
    # The killed process's leases lapse on the server (30 s); the others were settled.
    assert counts["failed"] == 0 and counts["done"] > 0
