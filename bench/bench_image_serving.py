"""What serving a folder job's images costs the server, against static file servers.

Run by hand, never in the test suite (numbers need a quiet machine):

    python bench/bench_image_serving.py                        # 2,000 images, 8 clients, 3 runs
    python bench/bench_image_serving.py --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/test

Once per invocation, ``--images`` small JPEGs (PIL noise, ``--width`` x ``--height``)
are written to a temporary folder (never into the repository). Then each run, fresh:

1. a ``trapline server`` on a temporary data dir (and, for PostgreSQL, a new database
   that is dropped afterwards), with a folder job over those images created through
   the API (``images_dir``) and every task reserved through the worker API, so the
   run holds one signed URL per image (leases long enough not to lapse meanwhile);
2. every URL downloaded by ``--clients`` concurrent httpx clients (keep-alive), each
   body checked against its file; the server's CPU (utime + stime from /proc, the
   process itself, not its nats-server) over that window, per download;
3. the same files, downloaded the same way from the references, each in its own
   process: ``starlette`` (its StaticFiles app on uvicorn, the HTTP stack trapline
   runs on), ``asgi`` (a bare ASGI app on uvicorn reading the file in a thread: the
   floor for a Python server here) and ``http.server`` (Python's, one connection per
   request). The server's idle CPU (its reconciler) is measured for ``IDLE_S`` before
   the downloads and reported beside them (not subtracted).

Ratios are trapline's over each reference's, from the same run; with ``--runs`` > 1
the summary gives medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import httpx
import procstat
from bench_e2e import BenchError, Cluster, free_port, on_fresh_site, trapline_bin
from PIL import Image

Metrics = dict[str, Any]
IDLE_S = 3.0
OUT: TextIO = sys.stdout

# A static-file server on the HTTP stack trapline runs on: the floor for one download.
STARLETTE_REFERENCE = """
import sys
import uvicorn
from starlette.staticfiles import StaticFiles
uvicorn.run(StaticFiles(directory=sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]),
            log_level="warning")
"""


# The floor of any Python file server here: uvicorn and a bare ASGI app, no framework,
# the file read in a thread as trapline does.
ASGI_REFERENCE = """
import asyncio, os, sys
import uvicorn
root = sys.argv[1]
def read(path):
    with open(path, "rb") as f:
        return f.read()
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    try:
        data = await asyncio.to_thread(read, os.path.join(root, scope["path"].lstrip("/")))
        status, headers = 200, [(b"content-type", b"image/jpeg")]
    except OSError:
        data, status, headers = b"", 404, []
    headers.append((b"content-length", str(len(data)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", lifespan="off")
"""


def say(*parts: object) -> None:
    print(*parts, file=OUT, flush=True)


def make_images(folder: Path, n: int, width: int, height: int) -> dict[str, bytes]:
    """``n`` distinct small JPEGs in ``folder`` (two levels, as camera folders are); id → bytes."""
    files: dict[str, bytes] = {}
    for i in range(n):
        rel = f"cam{i % 4}/{i:06d}.jpg"
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.effect_noise((width, height), 20 + i % 60).convert("RGB").save(path, quality=85)
        files[rel] = path.read_bytes()
    return files


@dataclass(frozen=True)
class Downloads:
    seconds: float
    cpu_s: float
    failures: list[str]


async def _download_all(
    urls: Sequence[tuple[str, str]], expected: dict[str, bytes], clients: int
) -> list[str]:
    """Every (image id, url) fetched once by ``clients`` concurrent clients; the failures."""
    todo = list(reversed(urls))
    failures: list[str] = []

    async def one_client() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            while todo:
                image_id, url = todo.pop()
                r = await client.get(url)
                if r.status_code != 200:
                    failures.append(f"{image_id}: HTTP {r.status_code} {r.text[:200]}")
                elif r.content != expected[image_id]:
                    failures.append(f"{image_id}: body differs from the file")
                elif r.headers.get("content-type") != "image/jpeg":
                    failures.append(f"{image_id}: content-type {r.headers.get('content-type')}")

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return failures


def download(
    pid: int, urls: Sequence[tuple[str, str]], expected: dict[str, bytes], clients: int
) -> Downloads:
    cpu0 = procstat.cpu_s(pid)
    t0 = time.perf_counter()
    failures = asyncio.run(_download_all(urls, expected, clients))
    seconds = time.perf_counter() - t0
    return Downloads(seconds, procstat.cpu_s(pid) - cpu0, failures)


def wait_listening(url: str, proc: subprocess.Popen[bytes], limit_s: float = 30) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        if proc.poll() is not None:
            raise BenchError(f"reference server exited with code {proc.returncode}")
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise BenchError(f"reference server not listening within {limit_s:g} s") from None
            time.sleep(0.1)


def reference(
    kind: str, folder: Path, expected: dict[str, bytes], clients: int, work_dir: Path
) -> Downloads:
    port = free_port()
    if kind == "starlette":
        cmd = [sys.executable, "-c", STARLETTE_REFERENCE, str(folder), str(port)]
    elif kind == "asgi":
        cmd = [sys.executable, "-c", ASGI_REFERENCE, str(folder), str(port)]
    else:
        cmd = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory"]
        cmd += [str(folder), str(port)]
    log = work_dir / f"reference-{kind}.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_listening(base + "/", proc)
        urls = [(image_id, f"{base}/{image_id}") for image_id in expected]
        return download(proc.pid, urls, expected, clients)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def signed_urls(client: httpx.Client, job_id: int, n: int) -> list[tuple[str, str]]:
    """Every task of the job reserved through the worker API: (image id, signed URL)."""
    urls: dict[str, str] = {}
    deadline = time.monotonic() + 120
    while len(urls) < n:
        r = client.post(f"/api/v2/jobs/{job_id}/tasks/", json={"batch_size": 256})
        if r.status_code != 200:
            raise BenchError(f"reserve: {r.status_code} {r.text[:500]}")
        urls.update((t["image_id"], t["image_url"]) for t in r.json()["tasks"])
        if time.monotonic() > deadline:
            raise BenchError(f"reserved {len(urls)} of {n} tasks within 120 s")
    return sorted(urls.items())


@dataclass(frozen=True)
class Options:
    clients: int
    database_url: str | None
    references: list[str]
    keep: bool


def one_run(opts: Options, trapline: str, folder: Path, expected: dict[str, bytes]) -> Metrics:
    return on_fresh_site(
        trapline,
        opts.database_url,
        lambda site: measure(
            site.cluster, opts, trapline, folder, expected, site.admin, site.worker
        ),
        keep=opts.keep,
        prefix="trapline-bench-files-",
        env={"TRAPLINE_ACK_WAIT_S": "3600"},  # no lease lapses inside the window
    )


def measure(
    c: Cluster,
    opts: Options,
    trapline: str,
    folder: Path,
    expected: dict[str, bytes],
    admin: str,
    worker: str,
) -> Metrics:
    n = len(expected)
    c.start_server(trapline, None)
    assert c.server is not None
    with httpx.Client(base_url=c.url, headers={"Authorization": f"Token {admin}"}) as client:
        r = client.post("/api/v2/jobs/", json={"pipeline": "null", "images_dir": str(folder)})
        if r.status_code != 201:
            raise BenchError(f"create job: {r.status_code} {r.text[:1000]}")
        job_id = int(r.json()["id"])
    worker_headers = {"Authorization": f"Token {worker}", "X-Worker-Name": "bench"}
    with httpx.Client(base_url=c.url, headers=worker_headers, timeout=60) as client:
        urls = signed_urls(client, job_id, n)
    # What the idle server burns anyway (its reconciler), to read the per-download figure by.
    idle0 = procstat.cpu_s(c.server.pid)
    time.sleep(IDLE_S)
    idle_ms_s = 1000 * (procstat.cpu_s(c.server.pid) - idle0) / IDLE_S
    got = download(c.server.pid, urls, expected, opts.clients)
    m: Metrics = {
        "trapline_idle_cpu_ms_per_s": idle_ms_s,
        "trapline_dl_s": n / got.seconds,
        "trapline_cpu_ms": 1000 * got.cpu_s / n,
        "failures": got.failures[:5],
        "ok": not got.failures,
    }
    for kind in opts.references:
        ref = reference(kind, folder, expected, opts.clients, c.data_dir)
        m[f"{kind}_dl_s"] = n / ref.seconds
        m[f"{kind}_cpu_ms"] = 1000 * ref.cpu_s / n
        m[f"vs_{kind}_rate_pct"] = 100 * m["trapline_dl_s"] / m[f"{kind}_dl_s"]
        m[f"vs_{kind}_cpu_x"] = m["trapline_cpu_ms"] / max(m[f"{kind}_cpu_ms"], 1e-9)
        if ref.failures:
            m["ok"] = False
            m["failures"] += ref.failures[:5]
    return m


def medians(runs: list[Metrics]) -> Metrics:
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def row(m: Metrics, references: list[str]) -> str:
    parts = [
        f"trapline {m['trapline_dl_s']:5.0f} dl/s {m['trapline_cpu_ms']:5.3f} ms CPU/dl"
        f" (idle {m['trapline_idle_cpu_ms_per_s']:.1f} ms/s)"
    ]
    for kind in references:
        parts.append(
            f"{kind} {m[f'{kind}_dl_s']:5.0f} dl/s {m[f'{kind}_cpu_ms']:5.3f} ms"
            f" (trapline {m[f'vs_{kind}_rate_pct']:5.1f} % of its rate,"
            f" {m[f'vs_{kind}_cpu_x']:4.1f}x its CPU)"
        )
    return " | ".join(parts)


def main() -> int:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--clients", type=int, default=8, help="concurrent httpx clients")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--database-url", help="PostgreSQL (postgresql+asyncpg://…); else SQLite")
    parser.add_argument(
        "--reference",
        action="append",
        choices=["starlette", "asgi", "http.server"],
        help="static servers to compare with (repeatable; default all)",
    )
    parser.add_argument("--json", type=Path, help="write every run's metrics here")
    parser.add_argument("--keep", action="store_true", help="keep each run's data dir")
    args = parser.parse_args()
    opts = Options(
        clients=args.clients,
        database_url=args.database_url,
        references=args.reference or ["starlette", "asgi", "http.server"],
        keep=args.keep,
    )
    images_root = Path(tempfile.mkdtemp(prefix="trapline-bench-images-"))
    runs: list[Metrics] = []
    try:
        t0 = time.perf_counter()
        expected = make_images(images_root / "night", args.images, args.width, args.height)
        mean_kb = sum(map(len, expected.values())) / len(expected) / 1024
        say(
            f"{args.images} JPEGs of {args.width}x{args.height} (mean {mean_kb:.1f} KiB) "
            f"in {time.perf_counter() - t0:.1f} s; {opts.clients} clients; "
            f"database {'PostgreSQL' if opts.database_url else 'SQLite'}"
        )
        trapline = trapline_bin()
        for i in range(args.runs):
            m = one_run(opts, trapline, images_root / "night", expected)
            runs.append(m)
            say(f"run {i + 1}: {row(m, opts.references)}" + ("" if m["ok"] else f" FAILED {m}"))
    except BenchError as exc:
        say(f"bench failed: {exc}")
        return 1
    finally:
        shutil.rmtree(images_root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))
    say(f"median of {len(runs)}: {row(medians(runs), opts.references)}")
    return 0 if all(m["ok"] for m in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
