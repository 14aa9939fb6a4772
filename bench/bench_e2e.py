"""End-to-end throughput: one server, N worker processes, a null-pipeline job.

Run by hand (not part of the test suite):

    python bench/bench_e2e.py --images 2000 --workers 4 --batch-size 16
    python bench/bench_e2e.py --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/test

Starts `trapline server` (embedded NATS unless --nats-url) and `trapline worker
--drain` processes, times the job from creation to its final status, and checks
the ledger invariants at rest: queued + reserved + done + failed = total and,
for a finished job, queued = reserved = 0.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def last_line(cmd: list[str], env: dict[str, str]) -> str:
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--nats-url", default=None)
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="trapline-bench-"))
    port = free_port()
    env = dict(os.environ, TRAPLINE_DATA_DIR=str(data_dir), TRAPLINE_LOG_LEVEL="WARNING")
    if args.database_url:
        env["TRAPLINE_DATABASE_URL"] = args.database_url
    if args.nats_url:
        env["TRAPLINE_NATS_URL"] = args.nats_url
    trapline = str(Path(sys.executable).parent / "trapline")
    admin = last_line([trapline, "token", "create", "--name", "bench", "--role", "admin"], env)
    worker = last_line([trapline, "token", "create", "--name", "bench-w", "--role", "worker"], env)
    server = subprocess.Popen([trapline, "server", "--port", str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    workers: list[subprocess.Popen[bytes]] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not become healthy")
            time.sleep(0.2)
        headers = {"Authorization": f"Token {admin}"}
        images = [
            {"id": str(i), "url": f"https://bench.invalid/{i}.jpg"} for i in range(args.images)
        ]
        t0 = time.monotonic()
        job = httpx.post(
            f"{url}/api/v2/jobs/",
            json={"name": "bench", "pipeline": "null", "images": images},
            headers=headers,
            timeout=120,
        ).json()
        t_created = time.monotonic()
        for n in range(args.workers):
            workers.append(
                subprocess.Popen(
                    [
                        trapline,
                        "worker",
                        "--server",
                        url,
                        "--token",
                        worker,
                        "--pipeline",
                        "null",
                        "--batch-size",
                        str(args.batch_size),
                        "--drain",
                        "--state-dir",
                        str(data_dir / f"worker-{n}"),
                    ],
                    env=env,
                )
            )
        while True:
            view = httpx.get(f"{url}/api/v2/jobs/{job['id']}/", headers=headers, timeout=30).json()
            if view["status"] in ("SUCCESS", "FAILURE", "REVOKED"):
                break
            time.sleep(0.1)
        t_done = time.monotonic()
        codes = [w.wait(timeout=120) for w in workers]
        counts = view["counts"]
        at_rest = counts["queued"] + counts["reserved"] + counts["done"] + counts["failed"]
        print(f"database: {args.database_url or 'sqlite (embedded)'}")
        print(f"images: {args.images}  workers: {args.workers}  batch: {args.batch_size}")
        print(f"job create + publish: {t_created - t0:.2f} s")
        print(f"processing (create → final): {t_done - t0:.2f} s")
        print(f"throughput: {args.images / (t_done - t_created):.0f} images/s")
        print(f"final: {view['status']} counts={counts} worker exit codes={codes}")
        ok = (
            view["status"] == "SUCCESS"
            and counts["done"] == args.images
            and at_rest == counts["total"] == args.images
            and counts["queued"] == counts["reserved"] == 0
            and all(c == 0 for c in codes)
        )
        print("invariants hold" if ok else "INVARIANTS VIOLATED")
        return 0 if ok else 1
    finally:
        for w in workers:
            if w.poll() is None:
                w.terminate()
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    raise SystemExit(main())
