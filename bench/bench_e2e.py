"""End-to-end throughput of one trapline server, measured against raw JetStream.

Run by hand, never in the test suite (numbers need a quiet machine):

    python bench/bench_e2e.py                                  # 20,000 images, batch 16, 3 runs
    python bench/bench_e2e.py --batch-size 256 --json out.json
    python bench/bench_e2e.py --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/test
    python bench/bench_e2e.py --create-only --images 100000   # job creation vs raw publish

Each run is fresh: a temporary data dir (and, for PostgreSQL, a new database that
is dropped afterwards), a ``trapline server`` with its embedded nats-server, and
``--workers`` ``trapline worker`` processes (null pipeline, ``--batch-size``) that
are started first and left idle until every one has registered and polled once.
Then, in the same run:

1. the reference: plain nats-py on the same nats-server (a stream of its own; see
   ``raw_nats.py``): publish N messages, then fetch(B)+ACK them at the same batch size;
2. a job of N manifest URLs of the ``null`` pipeline, created through the API
   (``POST /api/v2/jobs/``, body encoded before the clock starts), timed from the
   create request to the job's final status, read by ``GET /api/v2/jobs/{id}/``
   every ``--probe-interval`` seconds (the latencies of those reads are reported);
3. CPU = utime + stime from /proc over that same window: the server process itself
   (not its nats-server child), the workers (with any children), nats-server; per image.
   The status reads are inside the window; 20 more reads of the finished job estimate
   their server CPU, and the report also gives the server's CPU per image without them.
   "first task" says how long the idle workers took to notice the job (their poll
   interval, 2 s by default; ``--worker-poll-interval``), which the end-to-end time includes.

At the end: RSS (now and peak) of every process, the ledger invariants (queued +
reserved + done + failed = total; nothing queued or reserved at rest; done = N),
workers stopped by SIGTERM (exit 0 expected), the server stopped by SIGTERM (exit 0,
its nats-server gone). With ``--runs`` > 1 the summary gives medians.

``--create-only`` skips the workers: it times the create request of N images (the
request itself, not a CLI's start-up) against raw publish of N, with the server's CPU
per image of the creation, and then reads the idle job and the jobs list 20 times each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import asyncpg  # type: ignore[import-untyped]
import httpx
import procstat
import raw_nats

FINAL = ("SUCCESS", "FAILURE", "REVOKED")
Metrics = dict[str, Any]


class BenchError(Exception):
    """A run that could not be measured; the message says why."""


def say(*parts: object) -> None:
    print(*parts, file=OUT, flush=True)


OUT: TextIO = sys.stdout


# -- small helpers ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text[-lines:])


def trapline_bin() -> str:
    found = Path(sys.executable).parent / "trapline"
    if found.is_file():
        return str(found)
    which = shutil.which("trapline")
    if which is None:
        raise BenchError("the trapline command is not installed beside this Python")
    return which


def last_line(cmd: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not done.stdout.strip():
        raise BenchError(f"{' '.join(cmd[1:4])} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


# -- databases --------------------------------------------------------------------


def _pg_dsn(url: str, database: str | None = None) -> str:
    dsn = url.replace("postgresql+asyncpg://", "postgresql://", 1)
    if database is not None:
        dsn = dsn.rsplit("/", 1)[0] + "/" + database
    return dsn


async def _pg_execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(_pg_dsn(url), timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextmanager
def fresh_database(url: str | None, data_dir: Path) -> Iterator[str]:
    """The run's database URL: SQLite in the data dir, or a new PostgreSQL database."""
    if url is None:
        yield f"sqlite+aiosqlite:///{data_dir / 'trapline.db'}"
        return
    if not url.startswith("postgresql+asyncpg://"):
        raise BenchError("--database-url must be postgresql+asyncpg://… (or left out for SQLite)")
    name = f"trapline_bench_{uuid.uuid4().hex[:12]}"
    try:
        asyncio.run(_pg_execute(url, f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        raise BenchError(f"cannot create a database on {url}: {exc}") from exc
    try:
        yield url.rsplit("/", 1)[0] + "/" + name
    finally:
        asyncio.run(_pg_execute(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# -- processes --------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise BenchError(f"{self.name} exited with code {code}; its log:\n{tail(self.log)}")


@dataclass
class Cluster:
    """The run's processes; :meth:`shutdown` stops every one of them."""

    data_dir: Path
    env: dict[str, str]
    server: Proc | None = None
    nats_pid: int | None = None
    nats_url: str = ""
    url: str = ""
    workers: list[Proc] = field(default_factory=list)
    profiler: subprocess.Popen[bytes] | None = None

    def spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> Proc:
        log = self.data_dir / f"{name}.log"
        with log.open("wb") as f:
            popen = subprocess.Popen(
                cmd, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        return Proc(name, popen, log)

    def start_server(self, trapline: str, nats_url: str | None) -> None:
        port = free_port()
        env = dict(self.env, TRAPLINE_LOG_LEVEL="WARNING")
        self.server = self.spawn(
            "server", [trapline, "server", "--host", "127.0.0.1", "--port", str(port)], env
        )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            self.server.check_alive()
            try:
                if httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(
                    f"server not healthy within 90 s; its log:\n{tail(self.server.log)}"
                )
            time.sleep(0.2)
        if nats_url:
            self.nats_url = nats_url
            return
        nats = [c for c in procstat.children(self.server.pid) if c.comm == "nats-server"]
        if len(nats) != 1:
            raise BenchError(f"expected one nats-server child of the server, found {len(nats)}")
        self.nats_pid = nats[0].pid
        ports = self.data_dir / "nats" / "ports" / f"nats-server_{self.nats_pid}.ports"
        try:
            self.nats_url = str(json.loads(ports.read_text())["nats"][0])
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise BenchError(f"cannot read nats-server's port from {ports}: {exc}") from exc

    def start_workers(
        self, trapline: str, n: int, token: str, batch: int, poll_s: float | None
    ) -> None:
        env = dict(self.env)
        if poll_s is not None:
            env["TRAPLINE_POLL_INTERVAL_S"] = str(poll_s)
        for i in range(n):
            cmd = [
                trapline,
                "worker",
                "--server",
                self.url,
                "--token",
                token,
                "--pipeline",
                "null",
                "--batch-size",
                str(batch),
                "--state-dir",
                str(self.data_dir / f"worker-{i}"),
                "--log-level",
                "INFO",
            ]
            self.workers.append(self.spawn(f"worker-{i}", cmd, env))

    def wait_workers_idle(self, settle_s: float, client: httpx.Client) -> list[str]:
        """Every worker through its handshake, then ``settle_s`` for its first poll.

        A worker whose registration was refused (it logs a warning and polls anyway,
        registering again later) counts as ready once another one registered the
        pipeline; the refusals are returned, to be reported.
        """
        deadline = time.monotonic() + 120
        waiting = list(self.workers)
        refused: list[str] = []
        while waiting:
            for w in list(waiting):
                w.check_alive()
                text = w.log.read_text(errors="replace")
                if "registered pipelines" in text:
                    waiting.remove(w)
                elif "could not register pipelines" in text:
                    line = next(ln for ln in text.splitlines() if "could not register" in ln)
                    refused.append(f"{w.name}: {line.split(': ', 1)[-1]}")
                    waiting.remove(w)
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {w.name} (pid {w.pid}):\n{tail(w.log)}" for w in waiting)
                raise BenchError(f"workers not registered within 120 s:\n{logs}")
            time.sleep(0.1)
        # The reserve loop lists jobs right after registering, then sleeps its poll
        # interval (2 s by default): past this every worker is idle and polling.
        time.sleep(settle_s)
        for w in self.workers:
            w.check_alive()
        listing = client.get("/api/v2/pipelines/").json()
        if not any("null" in s.get("pipelines", []) for s in listing["processing_services"]):
            raise BenchError(f"no processing service serves the null pipeline: {listing}")
        return refused

    def start_profiler(self, out: Path) -> None:
        spy = shutil.which("py-spy")
        if spy is None:
            raise BenchError("--py-spy needs py-spy (pip install py-spy)")
        assert self.server is not None
        self.profiler = subprocess.Popen(
            [
                *(spy, "record", "--pid", str(self.server.pid), "--rate", "100"),
                *("--format", "raw", "--output", str(out), "--nonblocking"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop_profiler(self) -> None:
        if self.profiler is not None and self.profiler.poll() is None:
            self.profiler.send_signal(signal.SIGINT)
            try:
                self.profiler.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.profiler.kill()
                self.profiler.wait()
        self.profiler = None

    def stop_workers(self) -> list[int]:
        """SIGTERM every worker (a graceful stop), then their exit codes."""
        for w in self.workers:
            if w.popen.poll() is None:
                w.popen.terminate()
        codes = []
        for w in self.workers:
            try:
                codes.append(w.popen.wait(timeout=60))
            except subprocess.TimeoutExpired:
                w.popen.kill()
                codes.append(w.popen.wait())
        return codes

    def shutdown(self) -> list[str]:
        """Stop everything still running; the problems seen (empty when clean)."""
        problems: list[str] = []
        self.stop_profiler()
        for w, code in zip(self.workers, self.stop_workers(), strict=True):
            if code != 0:
                problems.append(f"{w.name} exited with code {code}")
        if self.server is not None:
            self.server.popen.terminate()
            try:
                code = self.server.popen.wait(timeout=60)
                # uvicorn re-raises the signal once its graceful shutdown is done.
                if code not in (0, -signal.SIGTERM):
                    problems.append(
                        f"server exited with code {code}; its log:\n{tail(self.server.log)}"
                    )
            except subprocess.TimeoutExpired:
                self.server.popen.kill()
                self.server.popen.wait()
                problems.append("server did not stop within 60 s of SIGTERM (killed)")
        if self.nats_pid is not None:
            for _ in range(50):
                if not procstat.alive(self.nats_pid):
                    break
                time.sleep(0.1)
            else:
                os.kill(self.nats_pid, signal.SIGKILL)
                problems.append(f"nats-server {self.nats_pid} outlived the server (killed)")
        return problems


# -- CPU and memory ---------------------------------------------------------------


@dataclass(frozen=True)
class CpuSnapshot:
    server: float
    workers: float
    nats: float
    # Every PostgreSQL process by pid (the machine's, not only this run's: run alone).
    postgres: dict[int, float] = field(default_factory=dict)

    @staticmethod
    def take(c: Cluster) -> CpuSnapshot:
        assert c.server is not None
        return CpuSnapshot(
            server=procstat.cpu_s(c.server.pid),
            workers=sum(procstat.tree_cpu_s(w.pid) for w in c.workers),
            nats=procstat.cpu_s(c.nats_pid) if c.nats_pid else 0.0,
            postgres=procstat.named_cpu_s("postgres"),
        )

    def postgres_since(self, before: CpuSnapshot) -> float:
        return procstat.named_cpu_delta_s(before.postgres, self.postgres)


def memory(c: Cluster) -> Metrics:
    assert c.server is not None
    mb = 1024.0
    server = procstat.memory_kb(c.server.pid)
    workers = [procstat.tree_memory_kb(w.pid) for w in c.workers]
    nats = procstat.memory_kb(c.nats_pid) if c.nats_pid else (0, 0)
    return {
        "server_rss_mb": server[0] / mb,
        "server_peak_mb": server[1] / mb,
        "worker_rss_mb": max(w[0] for w in workers) / mb if workers else None,
        "worker_peak_mb": max(w[1] for w in workers) / mb if workers else None,
        "nats_rss_mb": nats[0] / mb if c.nats_pid else None,
        "nats_peak_mb": nats[1] / mb if c.nats_pid else None,
    }


# -- one run ----------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    images: int
    workers: int
    batch_size: int
    database_url: str | None
    nats_url: str | None
    create_only: bool
    probe_interval: float
    settle: float
    worker_poll: float | None
    timeout: float
    keep: bool
    py_spy: Path | None
    page_size: int | None = None
    probe_for: float | None = None


def bench_images(start: int, stop: int) -> list[dict[str, str]]:
    return [{"id": str(i), "url": f"https://bench.invalid/{i}.jpg"} for i in range(start, stop)]


def job_body(n: int) -> bytes:
    return json.dumps({"name": "bench", "pipeline": "null", "images": bench_images(0, n)}).encode()


def page_bodies(n: int, page_size: int) -> list[bytes]:
    """``--page-size``: the bodies of the appended pages, encoded before the clock starts."""
    return [
        json.dumps({"images": bench_images(i, min(n, i + page_size))}).encode()
        for i in range(0, n, page_size)
    ]


def create_paged(client: httpx.Client, pages: list[bytes], m: Metrics) -> httpx.Response:
    """Create the job unstarted, append every page, start it; the start's answer."""
    json_type = {"Content-Type": "application/json"}
    t0 = time.perf_counter()
    r = client.post("/api/v2/jobs/", json={"name": "bench", "pipeline": "null", "start_now": False})
    if r.status_code != 201:
        raise BenchError(f"create job: {r.status_code} {r.text[:1000]}")
    job_id = r.json()["id"]
    for body in pages:
        r = client.post(f"/api/v2/jobs/{job_id}/images/", content=body, headers=json_type)
        if r.status_code != 200:
            raise BenchError(f"append images: {r.status_code} {r.text[:1000]}")
    t_appended = time.perf_counter()
    r = client.post(f"/api/v2/jobs/{job_id}/start/")
    m["append_s"] = t_appended - t0
    m["start_s"] = time.perf_counter() - t_appended
    if r.status_code == 200:
        r.status_code = 201  # as the one-request create answers
    return r


def get_json(client: httpx.Client, path: str) -> tuple[dict[str, Any], float]:
    t = time.perf_counter()
    r = client.get(path)
    dt = time.perf_counter() - t
    if r.status_code != 200:
        raise BenchError(f"GET {path}: {r.status_code} {r.text[:500]}")
    return r.json(), dt


def counts_ok(counts: dict[str, int], n: int, finished: bool) -> bool:
    at_rest = counts["queued"] + counts["reserved"] + counts["done"] + counts["failed"]
    if at_rest != counts["total"] or counts["total"] != n:
        return False
    if finished:
        return counts["queued"] == counts["reserved"] == 0 and counts["done"] == n
    return counts["queued"] == n and counts["reserved"] == counts["done"] == counts["failed"] == 0


@dataclass(frozen=True)
class Site:
    """A run's own ledger and processes: a temporary data dir, a fresh database, a
    cluster to start processes in, and an admin and a worker token."""

    data_dir: Path
    cluster: Cluster
    admin: str
    worker: str


def on_fresh_site(
    trapline: str,
    database_url: str | None,
    measure: Callable[[Site], Metrics],
    *,
    keep: bool,
    prefix: str = "trapline-bench-",
    env: Mapping[str, str] | None = None,
    worker_project: int | None = None,
) -> Metrics:
    """``measure`` on a site of its own, then its processes shut down: a run whose
    shutdown left problems is not ok. The data dir goes afterwards, unless ``keep`` or
    the run failed (its logs say why)."""
    data_dir = Path(tempfile.mkdtemp(prefix=prefix))
    m: Metrics = {}
    try:
        with fresh_database(database_url, data_dir) as db_url:
            run_env = dict(
                os.environ, TRAPLINE_DATA_DIR=str(data_dir), TRAPLINE_DATABASE_URL=db_url
            )
            run_env.update(env or {})
            run_env.pop("TRAPLINE_LOG_LEVEL", None)
            create = [trapline, "token", "create", "--name"]
            admin = last_line([*create, "bench", "--role", "admin"], run_env)
            project = ["--project", str(worker_project)] if worker_project is not None else []
            worker = last_line([*create, "bench-w", "--role", "worker", *project], run_env)
            cluster = Cluster(data_dir, run_env)
            try:
                m = measure(Site(data_dir, cluster, admin, worker))
            except BaseException:
                keep = True  # the logs say what went wrong
                raise
            finally:
                problems = cluster.shutdown()
                if problems:
                    m["ok"] = False
                    m["shutdown_problems"] = problems
    finally:
        if keep:
            say(f"  kept {data_dir} (logs, database)")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    return m


def one_run(opts: Options, trapline: str) -> Metrics:
    return on_fresh_site(
        trapline,
        opts.database_url,
        lambda site: measure(site.cluster, opts, trapline, site.admin, site.worker),
        keep=opts.keep,
        env={"TRAPLINE_NATS_URL": opts.nats_url} if opts.nats_url else None,
    )


def measure(c: Cluster, opts: Options, trapline: str, admin: str, worker: str) -> Metrics:
    n = opts.images
    c.start_server(trapline, opts.nats_url)
    assert c.server is not None
    raw = raw_nats.run(c.nats_url, n, None if opts.create_only else opts.batch_size)
    m: Metrics = {
        "raw_publish_msg_s": raw.publish_msg_s,
        "raw_fetch_ack_msg_s": raw.fetch_ack_msg_s,
    }
    pages = page_bodies(n, opts.page_size) if opts.page_size else []
    body = b"" if opts.page_size else job_body(n)
    headers = {"Authorization": f"Token {admin}"}
    with httpx.Client(base_url=c.url, headers=headers, timeout=600) as client:
        if not opts.create_only:
            c.start_workers(trapline, opts.workers, worker, opts.batch_size, opts.worker_poll)
            m["registration_refused"] = c.wait_workers_idle(opts.settle, client)
        if opts.py_spy:
            c.start_profiler(opts.py_spy)
        cpu0 = CpuSnapshot.take(c)
        t0 = time.perf_counter()
        if opts.page_size:
            r = create_paged(client, pages, m)
        else:
            r = client.post(
                "/api/v2/jobs/", content=body, headers={"Content-Type": "application/json"}
            )
        t_created = time.perf_counter()
        cpu_created = CpuSnapshot.take(c)
        if r.status_code != 201:
            raise BenchError(f"create job: {r.status_code} {r.text[:1000]}")
        job = r.json()
        m["create_s"] = t_created - t0
        m["create_img_s"] = n / m["create_s"]
        m["create_vs_publish_pct"] = 100 * m["create_img_s"] / raw.publish_msg_s
        m["create_server_cpu_ms_img"] = 1000 * (cpu_created.server - cpu0.server) / n
        m["create_nats_cpu_ms_img"] = (
            1000 * (cpu_created.nats - cpu0.nats) / n if c.nats_pid else None
        )
        if opts.database_url:
            m["create_postgres_cpu_ms_img"] = 1000 * cpu_created.postgres_since(cpu0) / n
        if opts.create_only:
            c.stop_profiler()
            view, _ = get_json(client, f"/api/v2/jobs/{job['id']}/")
            reads = [get_json(client, f"/api/v2/jobs/{job['id']}/")[1] for _ in range(20)]
            lists = [get_json(client, "/api/v2/jobs/?limit=100")[1] for _ in range(20)]
            m["idle_job_get_p50_ms"] = 1000 * statistics.median(reads)
            m["idle_jobs_list_p50_ms"] = 1000 * statistics.median(lists)
            m.update(memory(c))
            m["final_status"] = view["status"]
            m["counts"] = view["counts"]
            m["ok"] = view["status"] == "STARTED" and counts_ok(view["counts"], n, False)
            return m
        latencies: list[float] = []
        first_task_s: float | None = None
        while True:
            view, dt = get_json(client, f"/api/v2/jobs/{job['id']}/")
            latencies.append(dt)
            if first_task_s is None and view["counts"]["queued"] < n:
                first_task_s = time.perf_counter() - t0
                # Workers' memory once they are under way: the baseline of "flat".
                m["worker_rss_first_mb"] = memory(c)["worker_rss_mb"]
            if view["status"] in FINAL:
                break
            now = time.perf_counter()
            if opts.probe_for is not None and now - t0 > opts.probe_for:
                return probed_window(c, client, m, opts, job["id"], latencies, cpu0, now - t0)
            if now - t0 > opts.timeout:
                raise BenchError(f"job not finished after {opts.timeout:.0f} s: {view['counts']}")
            c.server.check_alive()
            for w in c.workers:
                w.check_alive()
            time.sleep(max(0.0, opts.probe_interval - dt))
        t_end = time.perf_counter()
        cpu1 = CpuSnapshot.take(c)
        c.stop_profiler()
        m.update(memory(c))
        elapsed = t_end - t0
        m["e2e_s"] = elapsed
        m["e2e_img_s"] = n / elapsed
        if raw.fetch_ack_msg_s:
            m["ratio_pct"] = 100 * m["e2e_img_s"] / raw.fetch_ack_msg_s
        server_s = cpu1.server - cpu0.server
        workers_s = cpu1.workers - cpu0.workers
        nats_s = cpu1.nats - cpu0.nats
        m["server_cpu_ms_img"] = 1000 * server_s / n
        m["workers_cpu_ms_img"] = 1000 * workers_s / n
        m["nats_cpu_ms_img"] = 1000 * nats_s / n if c.nats_pid else None
        if opts.database_url:
            m["postgres_cpu_ms_img"] = 1000 * cpu1.postgres_since(cpu0) / n
        total = server_s + workers_s + nats_s
        m["server_share_pct"] = 100 * server_s / total if total else None
        m["server_cpu_util_pct"] = 100 * server_s / elapsed
        m["status_reads"] = len(latencies)
        m["status_p50_ms"] = 1000 * (percentile(latencies, 50) or 0)
        m["status_p95_ms"] = 1000 * (percentile(latencies, 95) or 0)
        m["status_p99_ms"] = 1000 * (percentile(latencies, 99) or 0)
        m["status_max_ms"] = 1000 * max(latencies)
        m["first_task_s"] = first_task_s
        # The status reads are part of the window: estimate what they cost the server
        # with 20 more reads of the finished job, to show the CPU without them.
        cpu_a = procstat.cpu_s(c.server.pid)
        for _ in range(20):
            get_json(client, f"/api/v2/jobs/{job['id']}/")
        read_cpu_s = (procstat.cpu_s(c.server.pid) - cpu_a) / 20
        m["status_read_cpu_ms"] = 1000 * read_cpu_s
        m["server_cpu_ms_img_ex_reads"] = (
            1000 * max(0.0, server_s - read_cpu_s * len(latencies)) / n
        )
        codes = c.stop_workers()
        m["worker_exit_codes"] = codes
        rest, _ = get_json(client, f"/api/v2/jobs/{job['id']}/")
        m["final_status"] = rest["status"]
        m["counts"] = rest["counts"]
        m["ok"] = (
            view["status"] == rest["status"] == "SUCCESS"
            and counts_ok(rest["counts"], n, True)
            and all(code == 0 for code in codes)
        )
        return m


def probed_window(
    c: Cluster,
    client: httpx.Client,
    m: Metrics,
    opts: Options,
    job_id: int,
    latencies: list[float],
    cpu0: CpuSnapshot,
    elapsed: float,
) -> Metrics:
    """``--probe-for``: what the window showed of a job still running (status reads,
    images processed, server CPU per processed image); the job is then cancelled."""
    cpu1 = CpuSnapshot.take(c)
    c.stop_profiler()
    view, _ = get_json(client, f"/api/v2/jobs/{job_id}/")
    counts = view["counts"]
    processed = counts["done"] + counts["failed"]
    m.update(memory(c))
    m["partial"] = True
    m["e2e_s"] = elapsed
    m["processed"] = processed
    m["e2e_img_s"] = processed / elapsed
    if m.get("raw_fetch_ack_msg_s"):
        m["ratio_pct"] = 100 * m["e2e_img_s"] / m["raw_fetch_ack_msg_s"]
    m["server_cpu_ms_img"] = 1000 * (cpu1.server - cpu0.server) / max(1, processed)
    m["workers_cpu_ms_img"] = 1000 * (cpu1.workers - cpu0.workers) / max(1, processed)
    if opts.database_url:
        m["postgres_cpu_ms_img"] = 1000 * cpu1.postgres_since(cpu0) / max(1, processed)
    m["status_reads"] = len(latencies)
    for q in (50, 95, 99):
        m[f"status_p{q}_ms"] = 1000 * (percentile(latencies, q) or 0)
    m["status_max_ms"] = 1000 * max(latencies)
    r = client.post(f"/api/v2/jobs/{job_id}/cancel/")
    m["worker_exit_codes"] = c.stop_workers()
    m["final_status"] = r.json().get("status") if r.status_code == 200 else r.status_code
    m["counts"] = counts
    at_rest = sum(counts[k] for k in ("queued", "reserved", "done", "failed"))
    m["ok"] = at_rest == counts["total"] == opts.images and processed > 0
    return m


# -- reporting --------------------------------------------------------------------


def fmt(v: Any, digits: int = 0) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def report(m: Metrics, opts: Options) -> None:
    if opts.create_only:
        say(
            f"  creation        {fmt(m.get('create_img_s'))} img/s ({fmt(m.get('create_s'), 2)} s)"
            f" = {fmt(m.get('create_vs_publish_pct'), 1)} % of raw publish"
            f" {fmt(m.get('raw_publish_msg_s'))} msg/s"
        )
        say(
            f"  server CPU      {fmt(m.get('create_server_cpu_ms_img'), 3)} ms/img (creation);"
            f" nats {fmt(m.get('create_nats_cpu_ms_img'), 3)} ms/img,"
            f" postgres {fmt(m.get('create_postgres_cpu_ms_img'), 3)} ms/img"
        )
        if opts.page_size:
            say(
                f"  pages of {opts.page_size:,}  appended in {fmt(m.get('append_s'), 2)} s,"
                f" started (queued) in {fmt(m.get('start_s'), 2)} s"
            )
        say(
            f"  idle reads      GET job p50 {fmt(m.get('idle_job_get_p50_ms'), 1)} ms,"
            f" jobs list p50 {fmt(m.get('idle_jobs_list_p50_ms'), 1)} ms"
        )
    else:
        window = (
            f"the first {fmt(m.get('e2e_s'), 1)} s: {fmt(m.get('processed'))} images, then cancelled"
            if m.get("partial")
            else f"{fmt(m.get('e2e_s'), 2)} s create request → final status"
        )
        say(f"  end to end      {fmt(m.get('e2e_img_s'))} img/s ({window})")
        say(
            f"  raw fetch+ACK   {fmt(m.get('raw_fetch_ack_msg_s'))} msg/s"
            f"   ratio {fmt(m.get('ratio_pct'), 2)} %"
        )
        say(f"  raw publish     {fmt(m.get('raw_publish_msg_s'))} msg/s")
        say(
            f"  creation        {fmt(m.get('create_img_s'))} img/s ({fmt(m.get('create_s'), 2)} s)"
            f" = {fmt(m.get('create_vs_publish_pct'), 1)} % of raw publish;"
            f" server {fmt(m.get('create_server_cpu_ms_img'), 3)} ms/img"
        )
        say(
            f"  CPU per image   server {fmt(m.get('server_cpu_ms_img'), 3)} ms,"
            f" workers {fmt(m.get('workers_cpu_ms_img'), 3)} ms,"
            f" nats-server {fmt(m.get('nats_cpu_ms_img'), 3)} ms,"
            f" postgres {fmt(m.get('postgres_cpu_ms_img'), 3)} ms;"
            f" server = {fmt(m.get('server_share_pct'))} % of the three,"
            f" {fmt(m.get('server_cpu_util_pct'))} % of a core"
        )
        say(
            f"  status GET      p50 {fmt(m.get('status_p50_ms'), 1)} ms,"
            f" p95 {fmt(m.get('status_p95_ms'), 1)}, p99 {fmt(m.get('status_p99_ms'), 1)},"
            f" max {fmt(m.get('status_max_ms'), 1)} ({fmt(m.get('status_reads'))} reads,"
            f" ~{fmt(m.get('status_read_cpu_ms'), 1)} ms server CPU each: server"
            f" {fmt(m.get('server_cpu_ms_img_ex_reads'), 3)} ms/img without them)"
        )
        say(
            f"  first task      left the queue {fmt(m.get('first_task_s'), 2)} s after the create request"
        )
    say(
        f"  RSS MB          server {fmt(m.get('server_rss_mb'))} (peak {fmt(m.get('server_peak_mb'))}),"
        f" worker max {fmt(m.get('worker_rss_mb'))} (peak {fmt(m.get('worker_peak_mb'))};"
        f" {fmt(m.get('worker_rss_first_mb'))} when the first task left the queue),"
        f" nats-server {fmt(m.get('nats_rss_mb'))} (peak {fmt(m.get('nats_peak_mb'))})"
    )
    for refusal in m.get("registration_refused", []):
        say(f"  NOTE: registration refused, worker polled anyway: {refusal}")
    say(f"  final           {m.get('final_status')} counts={m.get('counts')}")
    for problem in m.get("shutdown_problems", []):
        say(f"  SHUTDOWN: {problem}")
    say("  invariants hold" if m.get("ok") else "  INVARIANTS VIOLATED")


def medians(runs: list[Metrics]) -> Metrics:
    keys = [k for k, v in runs[0].items() if isinstance(v, float | int) and not isinstance(v, bool)]
    out: Metrics = {}
    for k in keys:
        values = [r[k] for r in runs if isinstance(r.get(k), float | int)]
        out[k] = statistics.median(values) if values else None
    out["ok"] = all(r.get("ok") for r in runs)
    return out


def summary_row(med: Metrics, opts: Options) -> str:
    if opts.create_only:
        return (
            "| images | creation | raw publish | ratio | server CPU per image |\n"
            "|---|---|---|---|---|\n"
            f"| {opts.images:,} | {fmt(med.get('create_img_s'))} img/s"
            f" | {fmt(med.get('raw_publish_msg_s'))} msg/s"
            f" | {fmt(med.get('create_vs_publish_pct'), 1)} %"
            f" | {fmt(med.get('create_server_cpu_ms_img'), 3)} ms |"
        )
    return (
        "| batch | end to end | raw nats-py fetch(B)+ACK | ratio | server CPU per image |\n"
        "|---|---|---|---|---|\n"
        f"| {opts.batch_size} | {fmt(med.get('e2e_img_s'))} img/s"
        f" | {fmt(med.get('raw_fetch_ack_msg_s'))} msg/s | {fmt(med.get('ratio_pct'), 2)} %"
        f" | {fmt(med.get('server_cpu_ms_img'), 3)} ms |"
    )


def main() -> int:
    global OUT
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=20_000, help="images per job (20000)")
    parser.add_argument("--workers", type=int, default=4, help="worker processes (4)")
    parser.add_argument("--batch-size", type=int, default=16, help="tasks per reserve (16)")
    parser.add_argument(
        "--database-url",
        default=None,
        help="postgresql+asyncpg://… server; a fresh database per run, dropped after"
        " (default: SQLite in the run's temp dir)",
    )
    parser.add_argument("--nats-url", default=None, help="external NATS (default: embedded)")
    parser.add_argument("--runs", type=int, default=3, help="runs; the summary gives medians (3)")
    parser.add_argument(
        "--create-only", action="store_true", help="time job creation vs raw publish only"
    )
    parser.add_argument(
        "--page-size",
        type=int,
        default=None,
        help="create the job unstarted, append its images in pages of this many"
        " (POST /api/v2/jobs/{id}/images/), then start it; the clock covers all"
        " (default: one request)",
    )
    parser.add_argument(
        "--probe-for",
        type=float,
        default=None,
        metavar="S",
        help="measure only the first S seconds after the create request (status reads,"
        " images processed, CPU per processed image), then cancel the job: for jobs too big"
        " to finish, e.g. reads while a 1,000,000-image job runs",
    )
    parser.add_argument(
        "--probe-interval", type=float, default=0.1, help="status read every … s (0.1)"
    )
    parser.add_argument(
        "--worker-poll-interval",
        type=float,
        default=None,
        help="TRAPLINE_POLL_INTERVAL_S for the workers (default: theirs, 2 s); an idle"
        " worker finds the new job up to this late, and that delay is in the end-to-end time",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=None,
        help="s to wait after the workers registered, so each has polled"
        " (default: poll interval + 0.5)",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="per job, s (3600)")
    parser.add_argument(
        "--json", metavar="PATH", help="write every run and the medians (- = stdout)"
    )
    parser.add_argument(
        "--py-spy", metavar="PATH", type=Path, help="py-spy raw profile of the server"
    )
    parser.add_argument("--keep", action="store_true", help="keep each run's data dir and logs")
    args = parser.parse_args()
    if args.images < 1 or args.workers < 1 or args.batch_size < 1 or args.runs < 1:
        parser.error("--images, --workers, --batch-size and --runs must be at least 1")
    if args.page_size is not None and args.page_size < 1:
        parser.error("--page-size must be at least 1")
    if args.probe_for is not None and (args.probe_for <= 0 or args.create_only):
        parser.error("--probe-for needs a run with workers (no --create-only) and S > 0")
    if args.json == "-":
        OUT = sys.stderr
    opts = Options(
        images=args.images,
        workers=args.workers,
        batch_size=args.batch_size,
        database_url=args.database_url,
        nats_url=args.nats_url,
        create_only=args.create_only,
        probe_interval=args.probe_interval,
        settle=args.settle if args.settle is not None else (args.worker_poll_interval or 2.0) + 0.5,
        worker_poll=args.worker_poll_interval,
        timeout=args.timeout,
        keep=args.keep,
        py_spy=args.py_spy,
        page_size=args.page_size,
        probe_for=args.probe_for,
    )
    database = "postgresql" if opts.database_url else "sqlite"
    what = (
        f"create-only, {opts.images:,} images"
        + (f" in pages of {opts.page_size:,}" if opts.page_size else "")
        if opts.create_only
        else f"{opts.images:,} images, {opts.workers} workers, batch {opts.batch_size}"
    )
    runs: list[Metrics] = []
    try:
        trapline = trapline_bin()
        for i in range(args.runs):
            say(f"run {i + 1}/{args.runs}: {database}, {what}")
            py_spy = opts.py_spy
            if py_spy is not None and args.runs > 1:
                py_spy = py_spy.with_name(f"{py_spy.stem}-{i + 1}{py_spy.suffix}")
            m = one_run(Options(**{**opts.__dict__, "py_spy": py_spy}), trapline)
            report(m, opts)
            runs.append(m)
    except BenchError as exc:
        say(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    med = medians(runs)
    say(f"\nmedians of {len(runs)} run(s): {database}, {what}")
    say(summary_row(med, opts))
    if not opts.create_only:
        say(
            f"raw publish {fmt(med.get('raw_publish_msg_s'))} msg/s; creation"
            f" {fmt(med.get('create_img_s'))} img/s = {fmt(med.get('create_vs_publish_pct'), 1)} %;"
            f" workers {fmt(med.get('workers_cpu_ms_img'), 3)} ms/img,"
            f" nats-server {fmt(med.get('nats_cpu_ms_img'), 3)} ms/img,"
            f" postgres {fmt(med.get('postgres_cpu_ms_img'), 3)} ms/img;"
            f" status GET p99 {fmt(med.get('status_p99_ms'), 1)} ms"
        )
    say("invariants hold in every run" if med["ok"] else "INVARIANTS VIOLATED")
    if args.json:
        doc_out = {
            "config": {
                **{k: str(v) if isinstance(v, Path) else v for k, v in opts.__dict__.items()},
                "database": database,
                "cpus": os.cpu_count(),
            },
            "runs": runs,
            "median": med,
        }
        text = json.dumps(doc_out, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0 if med["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
