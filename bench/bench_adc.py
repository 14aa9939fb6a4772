"""ADC's own benchmark against trapline, and against ADC's mock Antenna, in the same run.

Issue 9's target: ADC's ``trapdata.antenna.benchmark`` (DataLoader + ResultPoster, batch 16,
2 DataLoader workers, 2,000 small images, a folder job) reaches at least 50 % of the
img/s it reaches against its own mock Antenna with a static file server, and is not
slower with 4 DataLoader workers than with 2.

Run by hand, never in the test suite (numbers need a quiet machine; ratios from the same
run are what count on a shared one):

    python bench/bench_adc.py --adc-python /tmp/adc/venv/bin/python   # 2 and 4 workers, 3 runs
    python bench/bench_adc.py --adc-python … --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/test

ADC (the AMI Data Companion, github RolnickLab/ami-data-companion) lives in a virtual
environment of its own, outside this repository. How it was set up (x86_64, Python 3.11;
torchvision from PyPI does not import beside torch 2.13.0 here, so the torch/torchvision
pair that lies on this machine's disk is used; gradio, kivy and boto3 are left out, as
nothing on the benchmark's path imports them):

    mkdir -p /tmp/adc/src
    git --git-dir=<a clone of ami-data-companion> archive HEAD | tar -x -C /tmp/adc/src
    python3.11 -m venv /tmp/adc/venv && . /tmp/adc/venv/bin/activate
    pip install torch==2.14.1 torchvision==0.29.1
    pip install --no-deps -e /tmp/adc/src
    pip install alembic fastapi imagesize pandas pydantic pydantic-settings python-dateutil \\
        python-dotenv requests rich sentry-sdk sqlalchemy sqlalchemy-utils structlog timm \\
        'typer>=0.12.3,<1' uvicorn

Once per invocation, ``--images`` small JPEGs (PIL noise, 320x240, as
``bench_image_serving.py`` makes them) are written to a temporary folder (never into the
repository). Then each run, fresh:

1. a ``trapline server`` on a temporary data dir (SQLite and its packaged nats-server,
   or a new PostgreSQL database dropped afterwards), an admin token and a worker token
   of project 1;
2. ADC's mock Antenna (``trapdata.antenna.tests.antenna_api_server``, its FastAPI app on
   uvicorn, one process) with ADC's ``StaticFileTestServer`` over the same folder in the
   same process, as ADC's own tests pair them ("mock"); one mock job per loader-workers
   value, its tasks pointing at the file server. That file server is Python's
   single-threaded ``http.server``, which listens with a backlog of 5: ADC's 8 download
   threads per DataLoader worker overflow it, and every dropped connect is retried by TCP
   a second later (``nstat`` shows TcpExtListenOverflows climbing), so this reference is
   slower than it need be. Hence a second one ("mockb", unless ``--mock-backlog 0``): the
   same mock and the same file server class, listening with a backlog of
   ``--mock-backlog`` (128): the stronger reference, which the target is read against;
3. for each ``--loader-workers`` value, interleaved: a new folder job (``images_dir``,
   pipeline ``null``: the benchmark takes a job id and asks for no pipeline) on trapline,
   waited for until it is STARTED with every image queued, then
   ``python -m trapdata.antenna.benchmark --job-id J --base-url …/api/v2 --num-workers W
   --batch-size B`` against it (worker token in ``AMI_ANTENNA_API_AUTH_TOKEN``); then the
   same command against each mock's job. The img/s is ADC's own "images/second
   (successful)" line. Around each: the server process's CPU (utime + stime from /proc;
   trapline's own process, not its nats-server) per image, and the client's CPU
   (the benchmark process and its reaped DataLoader workers, interpreter start-up and
   imports included) per image;
4. checks: ADC saw every image once with none failed to load and no failed result
   POST; on trapline every image ends with exactly one outcome (queued = reserved = 0,
   done + failed = total, by ``GET /api/v2/jobs/{id}/``). ADC's benchmark posts an
   *error* item for every image (its "acknowledgment"), so trapline records them as
   failed (the job ends FAILURE, by its failure threshold): failed = total is expected;
   on each mock, one posted result per image.

The table gives medians over ``--runs``: trapline img/s, each mock's img/s and trapline's
ratio to it, and trapline's and the mock's server CPU per image (the JSON has every
figure of every run, the client's CPU and mockb's too). ``--py-spy DIR`` records the trapline server during each of its
benchmark windows (raw format, one file per run and workers value).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
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
from bench_e2e import BenchError, Cluster, Site, free_port, on_fresh_site, tail, trapline_bin
from bench_image_serving import make_images, wait_listening

Metrics = dict[str, Any]
OUT: TextIO = sys.stdout
BENCH_MODULE = "trapdata.antenna.benchmark"
ADC_IMPORTS = (
    "import trapdata.antenna.benchmark, trapdata.antenna.tests.antenna_api_server,"
    " trapdata.api.tests.image_server"
)

# Run by ADC's Python: ADC's mock Antenna (its FastAPI app, unchanged, on uvicorn) and
# ADC's static file server (a thread of the same process, as in ADC's tests), with one
# job of every image per job id. One read-only route is added for the bench's check.
MOCK_SERVER = """
import sys
from pathlib import Path
import uvicorn
from trapdata.antenna.schemas import AntennaPipelineProcessingTask
from trapdata.antenna.tests import antenna_api_server as mock
from trapdata.api.tests.image_server import StaticFileTestServer

folder, port, jobs = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if int(sys.argv[4]):
    # http.server listens with a backlog of 5: more concurrent connects than that are
    # dropped and retried by TCP a second later. The same server, with a real backlog.
    from http.server import HTTPServer
    HTTPServer.request_queue_size = int(sys.argv[4])
files = StaticFileTestServer(folder)
files.start()
names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))
for job_id in range(1, jobs + 1):
    mock.setup_job(job_id, [
        AntennaPipelineProcessingTask(
            id=f"{job_id}:{name}", image_id=name, image_url=files.get_url(name),
            reply_subject=f"mock.{job_id}.{i}",
        )
        for i, name in enumerate(names)
    ])

def posted(job_id: int) -> dict[str, int]:
    ids = [getattr(r.result, "image_id", None) for r in mock.get_posted_results(job_id)]
    return {"results": len(ids), "distinct": len(set(ids))}

mock.app.add_api_route("/bench/posted/{job_id}", posted, methods=["GET"])
uvicorn.run(mock.app, host="127.0.0.1", port=port, log_level="warning")
"""


def say(*parts: object) -> None:
    print(*parts, file=OUT, flush=True)


# -- ADC --------------------------------------------------------------------------


def check_adc(adc_python: str) -> str:
    """ADC's Python, or a BenchError saying how to set it up."""
    exe = shutil.which(adc_python) or adc_python
    if not Path(exe).is_file():
        raise BenchError(f"--adc-python {adc_python!r} is not a file (see this module's docstring)")
    try:
        done = subprocess.run(
            [exe, "-c", ADC_IMPORTS], capture_output=True, text=True, timeout=300, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"cannot run {exe}: {exc}") from exc
    if done.returncode != 0:
        raise BenchError(
            f"ADC is not importable by {exe} ({ADC_IMPORTS!r} failed; set it up as this"
            f" module's docstring says):\n{done.stderr[-2000:]}"
        )
    return exe


@dataclass(frozen=True)
class AdcResult:
    img_s: float  # ADC's "images/second (successful)"
    adc_total_s: float  # ADC's "Total time"
    wall_s: float  # the whole command, interpreter start-up and imports included
    successful: int
    failed_images: int
    posts: int
    failed_posts: int
    client_cpu_s: float
    server_cpu_s: float
    problems: list[str]


def _number(pattern: str, text: str) -> float | None:
    found = re.search(pattern, text)
    return float(found.group(1)) if found else None


def run_adc(
    adc_python: str,
    base_url: str,
    token: str,
    job_id: int,
    workers: int,
    batch: int,
    server_pid: int,
    log: Path,
    timeout_s: float,
) -> AdcResult:
    """ADC's benchmark once against ``base_url``; its numbers, the CPU of both sides."""
    cmd = [adc_python, "-m", BENCH_MODULE, "--job-id", str(job_id), "--base-url", base_url]
    cmd += ["--num-workers", str(workers), "--batch-size", str(batch)]
    cmd += ["--gpu-batch-size", str(batch)]
    env = dict(os.environ, AMI_ANTENNA_API_AUTH_TOKEN=token, PYTHONUNBUFFERED="1")
    for k in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        env.pop(k, None)
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    server0 = procstat.cpu_s(server_pid)
    t0 = time.perf_counter()
    with log.open("wb") as f:
        try:
            code = subprocess.run(
                cmd,
                env=env,
                cwd=log.parent,
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=timeout_s,
                check=False,
            ).returncode
        except subprocess.TimeoutExpired as exc:
            raise BenchError(
                f"ADC's benchmark ran past {timeout_s:g} s; its log:\n{tail(log)}"
            ) from exc
    wall = time.perf_counter() - t0
    server_cpu = procstat.cpu_s(server_pid) - server0
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = (children1.ru_utime + children1.ru_stime) - (
        children0.ru_utime + children0.ru_stime
    )
    text = log.read_text(errors="replace")
    img_s = _number(r"([\d.]+) images/second \(successful\)", text)
    total_s = _number(r"Total time: ([\d.]+) seconds", text)
    successful = _number(r"Successful images: (\d+)", text)
    failed = _number(r"Failed images: (\d+)", text)
    posts = _number(r"Total posts: (\d+)", text)
    failed_posts = _number(r"Failed posts: (\d+)", text)
    if code != 0 or img_s is None or total_s is None or successful is None:
        raise BenchError(
            f"ADC's benchmark exited {code} without its summary; its log:\n{tail(log)}"
        )
    problems = [
        line.strip()
        for line in text.splitlines()
        if "Error occurred" in line or "Failed to post" in line or "Failed to load" in line
    ][:5]
    return AdcResult(
        img_s=img_s,
        adc_total_s=total_s,
        wall_s=wall,
        successful=int(successful),
        failed_images=int(failed or 0),
        posts=int(posts or 0),
        failed_posts=int(failed_posts or 0),
        client_cpu_s=client_cpu,
        server_cpu_s=server_cpu,
        problems=problems,
    )


def adc_problems(r: AdcResult, n: int) -> list[str]:
    """What ADC's own summary says went wrong (empty when it saw every image once)."""
    found = list(r.problems)
    if r.successful != n:
        found.append(f"ADC loaded {r.successful} images of {n}")
    if r.failed_images:
        found.append(f"ADC failed to load {r.failed_images} images")
    if r.failed_posts:
        found.append(f"{r.failed_posts} of {r.posts} result POSTs failed")
    return found


# -- the mock ---------------------------------------------------------------------


@dataclass
class Mock:
    name: str  # the metrics' prefix: "mock" (as ADC's tests run it) or "mockb" (real backlog)
    popen: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def start_mock(
    name: str, backlog: int, adc_python: str, folder: Path, jobs: int, work_dir: Path
) -> Mock:
    """ADC's mock and file server; ``backlog`` > 0 gives the file server that listen backlog."""
    port = free_port()
    log = work_dir / f"{name}.log"
    env = dict(os.environ)
    for k in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        env.pop(k, None)
    with log.open("wb") as f:
        popen = subprocess.Popen(
            [adc_python, "-c", MOCK_SERVER, str(folder), str(port), str(jobs), str(backlog)],
            env=env,
            cwd=work_dir,
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    mock = Mock(name, popen, f"http://127.0.0.1:{port}", log)
    try:
        wait_listening(f"{mock.url}/bench/posted/1", popen, limit_s=120)
    except BenchError as exc:
        mock.stop()
        raise BenchError(f"{exc}; the mock's log:\n{tail(log)}") from exc
    return mock


# -- trapline ---------------------------------------------------------------------


def create_folder_job(client: httpx.Client, folder: Path, n: int) -> int:
    """A folder job of the null pipeline, once STARTED with all ``n`` images queued."""
    r = client.post(
        "/api/v2/jobs/", json={"name": "adc", "pipeline": "null", "images_dir": str(folder)}
    )
    if r.status_code != 201:
        raise BenchError(f"create job: {r.status_code} {r.text[:1000]}")
    job_id = int(r.json()["id"])
    deadline = time.monotonic() + 120
    while True:
        view = job_view(client, job_id)
        if view["status"] == "STARTED" and view["counts"]["queued"] == n:
            return job_id
        if time.monotonic() > deadline:
            raise BenchError(f"job {job_id} not STARTED with {n} queued in 120 s: {view}")
        time.sleep(0.1)


def job_view(client: httpx.Client, job_id: int) -> dict[str, Any]:
    r = client.get(f"/api/v2/jobs/{job_id}/")
    if r.status_code != 200:
        raise BenchError(f"GET job {job_id}: {r.status_code} {r.text[:500]}")
    view: dict[str, Any] = r.json()
    return view


def trapline_outcomes(
    client: httpx.Client, job_id: int, n: int
) -> tuple[dict[str, Any], list[str]]:
    """The job's final view (waited for briefly) and what is wrong with its counts."""
    deadline = time.monotonic() + 30
    while True:
        view = job_view(client, job_id)
        if view["status"] in ("SUCCESS", "FAILURE", "REVOKED") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    c = view["counts"]
    problems = []
    if c["total"] != n:
        problems.append(f"total {c['total']} != {n}")
    if c["queued"] or c["reserved"]:
        problems.append(f"left without an outcome: queued {c['queued']}, reserved {c['reserved']}")
    if c["done"] + c["failed"] != c["total"]:
        problems.append(f"done {c['done']} + failed {c['failed']} != total {c['total']}")
    return view, problems


# -- one run ----------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    adc_python: str
    batch_size: int
    loader_workers: list[int]
    database_url: str | None
    timeout: float
    py_spy: Path | None
    keep: bool
    mock_backlog: int


def one_run(opts: Options, run: int, trapline: str, folder: Path, n: int) -> Metrics:
    def on(site: Site) -> Metrics:
        mocks: list[Mock] = []
        try:
            site.cluster.start_server(trapline, None)
            jobs = len(opts.loader_workers)
            mocks.append(start_mock("mock", 0, opts.adc_python, folder, jobs, site.data_dir))
            if opts.mock_backlog:
                mocks.append(
                    start_mock(
                        "mockb", opts.mock_backlog, opts.adc_python, folder, jobs, site.data_dir
                    )
                )
            return measure(opts, run, site.cluster, mocks, folder, n, site.admin, site.worker)
        finally:
            for mock in mocks:
                mock.stop()

    return on_fresh_site(
        trapline,
        opts.database_url,
        on,
        keep=opts.keep,
        prefix="trapline-bench-adc-",
        worker_project=1,
    )


def record(w: Metrics, prefix: str, r: AdcResult, n: int, problems: list[str]) -> None:
    w[f"{prefix}_img_s"] = r.img_s
    w[f"{prefix}_adc_total_s"] = r.adc_total_s
    w[f"{prefix}_wall_s"] = r.wall_s
    w[f"{prefix}_cpu_ms_img"] = 1000 * r.server_cpu_s / n
    w[f"{prefix}_client_cpu_ms_img"] = 1000 * r.client_cpu_s / n
    w[f"{prefix}_posts"] = r.posts
    w[f"{prefix}_problems"] = problems


def measure(
    opts: Options,
    run: int,
    c: Cluster,
    mocks: list[Mock],
    folder: Path,
    n: int,
    admin: str,
    worker: str,
) -> Metrics:
    assert c.server is not None
    server_pid = c.server.pid
    idle0 = procstat.cpu_s(server_pid)
    time.sleep(2.0)
    m: Metrics = {
        "trapline_idle_cpu_ms_per_s": 1000 * (procstat.cpu_s(server_pid) - idle0) / 2.0,
        "by_workers": {},
    }
    ok = True
    headers = {"Authorization": f"Token {admin}"}
    with httpx.Client(base_url=c.url, headers=headers, timeout=120) as client:
        for mock_job, workers in enumerate(opts.loader_workers, start=1):
            w: Metrics = {}
            job_id = create_folder_job(client, folder, n)
            if opts.py_spy is not None:
                opts.py_spy.mkdir(parents=True, exist_ok=True)
                c.start_profiler(opts.py_spy / f"trapline-run{run}-w{workers}.txt")
                time.sleep(1.0)  # py-spy attached before the clock starts
            try:
                t = run_adc(
                    opts.adc_python,
                    f"{c.url}/api/v2",
                    worker,
                    job_id,
                    workers,
                    opts.batch_size,
                    server_pid,
                    c.data_dir / f"adc-trapline-w{workers}.log",
                    opts.timeout,
                )
            finally:
                c.stop_profiler()
            view, problems = trapline_outcomes(client, job_id, n)
            all_problems = adc_problems(t, n) + problems
            record(w, "trapline", t, n, all_problems)
            w["trapline_status"] = view["status"]
            w["trapline_counts"] = view["counts"]
            for mock in mocks:
                r = run_adc(
                    opts.adc_python,
                    f"{mock.url}/api/v2",
                    "mock-token",
                    mock_job,
                    workers,
                    opts.batch_size,
                    mock.popen.pid,
                    c.data_dir / f"adc-{mock.name}-w{workers}.log",
                    opts.timeout,
                )
                posted = httpx.get(f"{mock.url}/bench/posted/{mock_job}", timeout=30).json()
                mock_problems = adc_problems(r, n)
                if posted != {"results": n, "distinct": n}:
                    mock_problems.append(f"{mock.name} holds {posted}, expected {n}, one per image")
                record(w, mock.name, r, n, mock_problems)
                w[f"vs_{mock.name}_pct"] = 100 * t.img_s / r.img_s if r.img_s else None
                all_problems += mock_problems
            w["ok"] = not all_problems
            ok = ok and not all_problems
            m["by_workers"][str(workers)] = w
            say(f"  {row(workers, w)}" + ("" if w["ok"] else f"  PROBLEMS {all_problems}"))
    m["ok"] = ok
    return m


# -- reporting --------------------------------------------------------------------

HEADER = (
    "| loader workers | trapline img/s | mock img/s | ratio | mock, backlog img/s | ratio"
    " | trapline server CPU ms/img | mock server CPU ms/img |\n|---|---|---|---|---|---|---|---|"
)


def fmt(v: Any, digits: int = 1) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def row(workers: int, w: Metrics) -> str:
    return (
        f"| {workers} | {fmt(w.get('trapline_img_s'))} | {fmt(w.get('mock_img_s'))}"
        f" | {fmt(w.get('vs_mock_pct'))} % | {fmt(w.get('mockb_img_s'))}"
        f" | {fmt(w.get('vs_mockb_pct'))} % | {fmt(w.get('trapline_cpu_ms_img'), 3)}"
        f" | {fmt(w.get('mock_cpu_ms_img'), 3)} |"
    )


def medians(runs: Sequence[Metrics], workers: int) -> Metrics:
    rows = [r["by_workers"][str(workers)] for r in runs if str(workers) in r["by_workers"]]
    if not rows:
        return {}
    keys = [k for k, v in rows[0].items() if isinstance(v, float | int) and not isinstance(v, bool)]
    out: Metrics = {}
    for k in keys:
        values = [x[k] for x in rows if isinstance(x.get(k), float | int)]
        out[k] = statistics.median(values) if values else None
    return out


def parse_workers(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("give one or more worker counts ≥ 0")
    return values


def main() -> int:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--adc-python", required=True, help="Python of a venv with ADC installed (see above)"
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=16, help="ADC's --batch-size (16)")
    parser.add_argument(
        "--loader-workers",
        type=parse_workers,
        default=[2, 4],
        help="ADC's --num-workers values, comma-separated (2,4)",
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--database-url", help="PostgreSQL (postgresql+asyncpg://…); else SQLite")
    parser.add_argument("--timeout", type=float, default=900, help="per ADC benchmark, s (900)")
    parser.add_argument("--json", type=Path, help="write every run and the medians here")
    parser.add_argument(
        "--py-spy", type=Path, metavar="DIR", help="py-spy raw profiles of the trapline server"
    )
    parser.add_argument(
        "--mock-backlog",
        type=int,
        default=128,
        help="also run the mock with its file server listening with this backlog instead of"
        " http.server's 5 (0: only the mock as ADC's tests run it) (128)",
    )
    parser.add_argument("--keep", action="store_true", help="keep each run's data dir and logs")
    args = parser.parse_args()
    if args.images < 1 or args.batch_size < 1 or args.runs < 1:
        parser.error("--images, --batch-size and --runs must be at least 1")
    images_root = Path(tempfile.mkdtemp(prefix="trapline-bench-adc-images-"))
    runs: list[Metrics] = []
    try:
        opts = Options(
            adc_python=check_adc(args.adc_python),
            batch_size=args.batch_size,
            loader_workers=args.loader_workers,
            database_url=args.database_url,
            timeout=args.timeout,
            py_spy=args.py_spy.resolve() if args.py_spy else None,
            keep=args.keep,
            mock_backlog=args.mock_backlog,
        )
        t0 = time.perf_counter()
        folder = images_root / "night"
        expected = make_images(folder, args.images, args.width, args.height)
        mean_kb = sum(map(len, expected.values())) / len(expected) / 1024
        say(
            f"{args.images} JPEGs of {args.width}x{args.height} (mean {mean_kb:.1f} KiB) in"
            f" {time.perf_counter() - t0:.1f} s; ADC batch {opts.batch_size}, loader workers"
            f" {opts.loader_workers}; database {'PostgreSQL' if opts.database_url else 'SQLite'};"
            f" {os.cpu_count()} CPUs"
        )
        trapline = trapline_bin()
        for i in range(1, args.runs + 1):
            say(f"run {i}/{args.runs}\n{HEADER}")
            runs.append(one_run(opts, i, trapline, folder, args.images))
    except BenchError as exc:
        say(f"bench failed: {exc}")
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        shutil.rmtree(images_root, ignore_errors=True)
    med = {str(w): medians(runs, w) for w in opts.loader_workers}
    say(f"\nmedians of {len(runs)} run(s)\n{HEADER}")
    for w in opts.loader_workers:
        say(row(w, med[str(w)]))
    first, *rest = opts.loader_workers
    for w in rest:
        a, b = med[str(first)].get("trapline_img_s"), med[str(w)].get("trapline_img_s")
        if a and b:
            say(f"trapline with {w} loader workers: {100 * b / a:.1f} % of its img/s with {first}")
    ok = all(r.get("ok") for r in runs)
    say("every image had one outcome on both servers in every run" if ok else "PROBLEMS (above)")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "median": med}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
