"""How fast outcomes are known: lease expiry → image failed, last result → job final.

Run by hand (not part of the test suite):

    python bench/bench_reconciler.py --rounds 5

Starts `trapline server` (embedded NATS, SQLite unless --database-url) with a
2 s lease and 2 deliveries. Per round: a client reserves a batch and drops it
on every delivery; we time from the last lease's end (reserve time + ack_wait)
to the moment the images show as failed. Then a job is completed by posting
its last result; we time from the POST's answer to the job's final status.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_e2e import free_port, last_line

ACK_WAIT_S = 2.0


def wait_healthy(url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit("server did not become healthy")


def result(task: dict[str, str]) -> dict[str, object]:
    return {
        "reply_subject": task["reply_subject"],
        "result": {
            "pipeline": "null",
            "source_images": [{"id": task["image_id"], "url": task["image_url"]}],
            "detections": [],
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="trapline-bench-"))
    env = dict(
        os.environ,
        TRAPLINE_DATA_DIR=str(data_dir),
        TRAPLINE_LOG_LEVEL="ERROR",
        TRAPLINE_ACK_WAIT_S=str(ACK_WAIT_S),
        TRAPLINE_MAX_DELIVER="2",
    )
    if args.database_url:
        env["TRAPLINE_DATABASE_URL"] = args.database_url
    trapline = str(Path(sys.executable).parent / "trapline")
    admin = last_line([trapline, "token", "create", "--name", "b", "--role", "admin"], env)
    worker = last_line([trapline, "token", "create", "--name", "bw", "--role", "worker"], env)
    port = free_port()
    server = subprocess.Popen([trapline, "server", "--port", str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    expiry_to_failed: list[float] = []
    last_result_to_final: list[float] = []
    try:
        wait_healthy(url)
        a = httpx.Client(base_url=url, headers={"Authorization": f"Token {admin}"}, timeout=30)
        w = httpx.Client(base_url=url, headers={"Authorization": f"Token {worker}"}, timeout=30)
        for n in range(args.rounds):
            images = [{"id": str(i), "url": f"https://x.invalid/{n}/{i}.jpg"} for i in range(8)]
            jid = a.post("/api/v2/jobs/", json={"pipeline": "null", "images": images}).json()["id"]
            # Drop the first delivery, then the second (the last allowed one).
            last_reserve = 0.0
            for _ in range(2):
                while True:
                    got = w.post(f"/api/v2/jobs/{jid}/tasks/", json={"batch_size": 8}).json()
                    if got["tasks"]:
                        last_reserve = time.monotonic()
                        break
                    time.sleep(0.05)
            lease_end = last_reserve + ACK_WAIT_S
            while a.get(f"/api/v2/jobs/{jid}/").json()["counts"]["failed"] < 8:
                time.sleep(0.05)
            expiry_to_failed.append(time.monotonic() - lease_end)
            # A second job completed by one POST: the job must be final when it answers.
            jid = a.post("/api/v2/jobs/", json={"pipeline": "null", "images": images}).json()["id"]
            tasks = w.post(f"/api/v2/jobs/{jid}/tasks/", json={"batch_size": 8}).json()["tasks"]
            body = {"results": [result(t) for t in tasks]}
            posted = w.post(f"/api/v2/jobs/{jid}/result/", json=body)
            answered = time.monotonic()
            assert posted.status_code == 200
            while a.get(f"/api/v2/jobs/{jid}/").json()["status"] == "STARTED":
                time.sleep(0.01)
            last_result_to_final.append(time.monotonic() - answered)
        print(f"database: {args.database_url or 'sqlite (embedded)'}; ack_wait {ACK_WAIT_S} s")
        for name, values in (
            ("last lease expiry -> images failed", expiry_to_failed),
            ("last result answered -> job final", last_result_to_final),
        ):
            print(
                f"{name}: median {statistics.median(values):.2f} s, "
                f"max {max(values):.2f} s over {len(values)} rounds"
            )
        return 0
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    raise SystemExit(main())
