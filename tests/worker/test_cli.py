"""``python -m trapline.worker`` as a real subprocess: exit codes, SIGTERM, several processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.worker.worker_fakes import FakeAntenna, wait_until

pytestmark = pytest.mark.timeout(120)


def worker_cmd(fake: FakeAntenna, state_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trapline.worker",
        "--server",
        fake.url,
        "--token",
        "secret",
        "--state-dir",
        str(state_dir),
        *extra,
    ]


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TRAPLINE_", "AMI_"))}
    clean["TRAPLINE_POLL_INTERVAL_S"] = "0.05"
    clean["TRAPLINE_DELIVERY_BACKOFF_CAP_S"] = "0.1"
    return clean


def run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env())


def test_start_errors_are_one_line_and_exit_2(fake: FakeAntenna, tmp_path: Path) -> None:
    fake.add_job(1, "null", ["a"])
    missing = run(worker_cmd(fake, tmp_path))
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        "error: no pipeline given: pass --pipeline SLUG (see `trapline pipelines`)"
    )
    unknown = run(worker_cmd(fake, tmp_path, "--pipeline", "nope"))
    assert unknown.returncode == 2
    assert unknown.stderr.strip().startswith("error: unknown pipeline 'nope'; installed:")
    assert len(unknown.stderr.strip().splitlines()) == 1
    no_file = run(worker_cmd(fake, tmp_path, "--pipeline-file", str(tmp_path / "gone.toml")))
    assert no_file.returncode == 2
    assert len(no_file.stderr.strip().splitlines()) == 1 and "gone.toml" in no_file.stderr
    bad_token = run([*worker_cmd(fake, tmp_path, "--pipeline", "null"), "--token", "wrong"])
    assert bad_token.returncode == 2 and "refused the token" in bad_token.stderr
    assert fake.count("reserve") == 0


def test_drain_exits_0_after_delivering_everything(fake: FakeAntenna, tmp_path: Path) -> None:
    fake.add_job(1, "null", [f"i{n}" for n in range(50)])
    done = run(worker_cmd(fake, tmp_path, "--pipeline", "null", "--drain", "--batch-size", "8"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert fake.at_rest(1) == (0, 0, 50)


def test_sigterm_delivers_or_releases_everything_and_exits_0(
    fake: FakeAntenna, tmp_path: Path
) -> None:
    fake.add_job(1, "null", [f"i{n}" for n in range(20000)])
    proc = subprocess.Popen(
        worker_cmd(fake, tmp_path, "--pipeline", "null", "--batch-size", "4"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env(),
    )
    try:
        wait_until(lambda: fake.at_rest(1)[2] >= 20, timeout=60)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    ready, leased, done = fake.at_rest(1)
    # Nothing is left leased to the stopped worker: each image is done or ready again.
    assert leased == 0 and ready + done == 20000 and done < 20000


def test_several_processes_share_the_work(fake: FakeAntenna, tmp_path: Path) -> None:
    fake.add_job(1, "null", [f"i{n}" for n in range(400)])
    done = run(
        worker_cmd(fake, tmp_path, "--pipeline", "null", "--drain", "--processes", "2"), timeout=90
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert fake.at_rest(1) == (0, 0, 400)
    assert "[worker 1]" in done.stderr and "[worker 0]" in done.stderr
    # Each process took its own outbox slot.
    assert {p.name for p in tmp_path.glob("outbox-*.sqlite3")} == {
        "outbox-0.sqlite3",
        "outbox-1.sqlite3",
    }


def child_pids(parent: int) -> list[int]:
    """Worker processes spawned by ``parent`` (not multiprocessing's helper processes)."""
    pids: list[int] = []
    for task in Path(f"/proc/{parent}/task").iterdir():
        for pid in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
                pids.append(int(pid))
    return pids


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_a_killed_process_is_restarted_while_its_sibling_goes_on(
    fake: FakeAntenna, tmp_path: Path
) -> None:
    fake.add_job(1, "null", [f"i{n}" for n in range(50000)])
    proc = subprocess.Popen(
        worker_cmd(fake, tmp_path, "--pipeline", "null", "--processes", "2", "--batch-size", "4"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env(),
    )
    try:
        wait_until(lambda: len(child_pids(proc.pid)) == 2, timeout=60)
        wait_until(lambda: len(fake.registrations) == 2, timeout=60)
        victim, sibling = child_pids(proc.pid)
        os.kill(victim, signal.SIGKILL)
        # A third process registers: the replacement; the sibling is untouched.
        wait_until(lambda: len(fake.registrations) == 3, timeout=60)
        assert sibling in child_pids(proc.pid) and victim not in child_pids(proc.pid)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "killed by signal 9" in output and "restarting it" in output
    assert proc.returncode == 0, output
