"""``trapline job …``: create, follow and manage jobs through the server's job API.

The commands and the API calls behind them are here; how jobs are shown is in
:mod:`trapline.cli.job_views`, how manifests are read in :mod:`trapline.cli.manifest`.
"""

from __future__ import annotations

import csv
import io
import itertools
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from trapline.cli.client import (
    ApiClient,
    CliError,
    JsonOpt,
    LogLevelOpt,
    ServerOpt,
    TokenOpt,
    api_client,
    cli_errors,
    err,
    out,
    setup_logging,
)
from trapline.cli.job_views import (
    counts_line,
    inspection_view,
    job_summary,
    jobs_table,
    log_lines,
    print_json,
    results_table,
    watch,
)
from trapline.cli.manifest import Manifest

job_app = typer.Typer(help="Create, follow and manage jobs.", no_args_is_help=True)

# Images fetched per request when the CLI pages through a job's ledger rows.
PAGE = 10_000
RESULTS_PAGE = 10_000
# Images per request when uploading a big manifest (the server accepts at most this many).
UPLOAD_PAGE = 10_000
# A conservative rate of queuing, for the start request's timeout.
START_IMAGES_PER_S = 2_000

JobIdArg = Annotated[int, typer.Argument(help="Job id.", min=1)]


def finished_exit(view: dict[str, Any]) -> int:
    """0 for SUCCESS, 1 for any other finished status."""
    return 0 if view.get("status") == "SUCCESS" else 1


# ── commands ───────────────────────────────────────────────────────────────────


@job_app.command("create")
def create(
    pipeline: Annotated[str, typer.Option(help="Pipeline slug, e.g. moth-detector-cv.")],
    images_dir: Annotated[
        Path | None,
        typer.Option(
            "--images-dir",
            help="Folder of images on the server's machine (sent as an absolute path).",
        ),
    ] = None,
    manifest: Annotated[
        Path | None,
        typer.Option(help="File of image URLs: one per line, CSV id,url, or JSON [{id,url}]."),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Job name.")] = None,
    project: Annotated[int, typer.Option(help="Project id.", min=1)] = 1,
    failure_threshold: Annotated[
        float | None,
        typer.Option(
            help="Failed share above which the job ends FAILURE [default: 0.5].", min=0, max=1
        ),
    ] = None,
    deadline_seconds: Annotated[
        float | None,
        typer.Option(help="Fail what is left after this many seconds (default: no deadline)."),
    ] = None,
    page_size: Annotated[
        int,
        typer.Option(
            help="Images per request: a bigger manifest is uploaded page by page, then started.",
            min=1,
            max=UPLOAD_PAGE,
        ),
    ] = UPLOAD_PAGE,
    server: ServerOpt = None,
    token: TokenOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Create a job and start it; prints the job id as the last line."""
    with cli_errors():
        setup_logging(log_level)
        if (images_dir is None) == (manifest is None):
            raise CliError("give exactly one of --images-dir and --manifest")
        if deadline_seconds is not None and deadline_seconds <= 0:
            raise CliError("--deadline-seconds must be positive")
        body: dict[str, Any] = {"pipeline": pipeline, "project_id": project, "start_now": True}
        if name:
            body["name"] = name
        if failure_threshold is not None:
            body["failure_threshold"] = failure_threshold
        if deadline_seconds is not None:
            body["deadline_seconds"] = deadline_seconds
        with api_client(server, token) as client:
            if images_dir is not None:
                # The server reads the folder itself; it resolves nothing relative to us.
                body["images_dir"] = str(images_dir.expanduser().resolve())
                view = client.post("/api/v2/jobs/", body)
            else:
                assert manifest is not None
                view = upload_manifest(client, body, manifest, page_size)
        counts = view.get("counts") or {}
        out.print(
            f"created job {view['id']} {view.get('name', '')!r}: {counts.get('total', 0)} images, "
            f"pipeline {view.get('pipeline_slug')}, status {view.get('status')}",
            markup=False,
        )
        typer.echo(view["id"])


def upload_manifest(
    client: ApiClient, body: dict[str, Any], path: Path, page_size: int
) -> dict[str, Any]:
    """Create the job of a manifest, started; the job's view.

    A manifest of up to ``page_size`` images is one request. A bigger one is read as
    a stream and sent a page at a time to a job created unstarted, with a progress
    bar, and the job is started once every page is in: neither the CLI nor the
    server ever holds the whole manifest.
    """
    with Manifest(path) as manifest:
        images = manifest.images()
        page = list(itertools.islice(images, page_size + 1))
        if len(page) <= page_size:
            return dict(client.post("/api/v2/jobs/", {**body, "images": page}))
        job_id = int(client.post("/api/v2/jobs/", {**body, "start_now": False})["id"])
        sent = 0
        try:
            with Progress(
                TextColumn(f"job {job_id}: uploading"),
                BarColumn(bar_width=30),
                TaskProgressColumn(),
                TextColumn("{task.fields[sent]} images"),
                TimeElapsedColumn(),
                console=err,
            ) as progress:
                bar = progress.add_task("upload", total=manifest.size, sent="0")
                while page:
                    client.post(
                        f"/api/v2/jobs/{job_id}/images/",
                        {"images": page[:page_size]},
                        index_base=sent,
                    )
                    sent += len(page[:page_size])
                    progress.update(bar, completed=manifest.bytes_read, sent=f"{sent:,}")
                    page = page[page_size:] + list(itertools.islice(images, page_size))
                progress.update(bar, completed=manifest.size)
            # Queuing publishes every image before it answers: allow it the time.
            timeout_s = max(30.0, sent / START_IMAGES_PER_S)
            return dict(client.post(f"/api/v2/jobs/{job_id}/start/", timeout_s=timeout_s))
        except CliError as exc:
            raise CliError(
                f"{exc} (job {job_id} was left unstarted with {sent:,} images)", exc.code
            ) from None


@job_app.command("status")
def status(
    job_id: JobIdArg,
    as_json: JsonOpt = False,
    follow: Annotated[
        bool, typer.Option("--watch", help="Follow live progress until the job finishes.")
    ] = False,
    interval: Annotated[
        float, typer.Option(help="Seconds between polls with --watch.", min=0.1)
    ] = 1.0,
    server: ServerOpt = None,
    token: TokenOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Show a job's status; with --watch, follow it (exit 0 on SUCCESS, 1 otherwise)."""
    with cli_errors(), api_client(server, token) as client:
        setup_logging(log_level)
        view = watch(client, job_id, interval) if follow else client.get(f"/api/v2/jobs/{job_id}/")
        if as_json:
            print_json(view)
        else:
            out.print(job_summary(view))
        if follow:
            raise typer.Exit(finished_exit(view))


@job_app.command("list")
def list_jobs(
    status_filter: Annotated[
        str | None,
        typer.Option("--status", help="Only jobs with this status (comma-separated)."),
    ] = None,
    limit: Annotated[int, typer.Option(help="How many jobs (newest first).", min=1, max=1000)] = 50,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    as_json: JsonOpt = False,
    server: ServerOpt = None,
    token: TokenOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """List jobs, newest first."""
    with cli_errors(), api_client(server, token) as client:
        setup_logging(log_level)
        page = client.get("/api/v2/jobs/", status=status_filter, limit=limit, offset=offset)
        if as_json:
            print_json(page)
            return
        out.print(jobs_table(page))


@job_app.command("cancel")
def cancel(
    job_id: JobIdArg,
    server: ServerOpt = None,
    token: TokenOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Stop handing out the job's tasks; results already stored stay."""
    _job_action(job_id, "cancel", server, token, log_level)


@job_app.command("retry")
def retry(
    job_id: JobIdArg,
    server: ServerOpt = None,
    token: TokenOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Queue the job's failed images again."""
    _job_action(job_id, "retry", server, token, log_level)


def _job_action(
    job_id: int, action: str, server: str | None, token: str | None, log_level: str | None
) -> None:
    """POST a job action and print the job's new status and counts."""
    with cli_errors(), api_client(server, token) as client:
        setup_logging(log_level)
        view = client.post(f"/api/v2/jobs/{job_id}/{action}/")
        out.print(f"job {job_id}: {view.get('status')} · {counts_line(view.get('counts') or {})}")


def all_results(client: ApiClient, job_id: int) -> list[dict[str, Any]]:
    """Every detection of a job, page by page."""
    found: list[dict[str, Any]] = []
    while True:
        page = client.get(f"/api/v2/jobs/{job_id}/results/", limit=RESULTS_PAGE, offset=len(found))
        rows = page.get("results") or []
        found.extend(rows)
        if len(rows) < RESULTS_PAGE:
            return found


def all_csv(client: ApiClient, job_id: int) -> tuple[str, int]:
    """The job's detections as one CSV text (pages joined under one header) and its row count."""
    header = ""
    body: list[str] = []
    offset = 0
    while True:
        text = client.get_text(
            f"/api/v2/jobs/{job_id}/results/", format="csv", limit=RESULTS_PAGE, offset=offset
        )
        lines = text.splitlines(keepends=True)
        if not lines:
            break
        header = header or lines[0]
        rows = lines[1:]
        body.extend(rows)
        offset += len(rows)
        if len(rows) < RESULTS_PAGE:
            break
    # Row count by parsing: a label may in principle hold a newline inside quotes.
    count = sum(1 for _ in csv.reader(io.StringIO("".join(body))))
    return header + "".join(body), count


@job_app.command("results")
def results(
    job_id: JobIdArg,
    csv_file: Annotated[
        Path | None,
        typer.Option("--csv", help="Write the detections as CSV to this file ('-': stdout)."),
    ] = None,
    as_json: JsonOpt = False,
    server: ServerOpt = None,
    token: TokenOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """A job's detections: a table, JSON, or a CSV file."""
    with cli_errors(), api_client(server, token) as client:
        setup_logging(log_level)
        if csv_file is not None:
            text, count = all_csv(client, job_id)
            if str(csv_file) == "-":
                typer.echo(text, nl=False)
                return
            try:
                csv_file.write_text(text, encoding="utf-8")
            except OSError as exc:
                raise CliError(f"cannot write {csv_file}: {exc.strerror or exc}") from None
            out.print(f"wrote {count} detection(s) of job {job_id} to {csv_file}", markup=False)
            return
        detections = all_results(client, job_id)
        if as_json:
            print_json({"job_id": job_id, "count": len(detections), "results": detections})
            return
        out.print(results_table(job_id, detections))


@job_app.command("logs")
def logs(
    job_id: JobIdArg,
    limit: Annotated[int, typer.Option(help="Newest lines to show.", min=1, max=10_000)] = 1000,
    as_json: JsonOpt = False,
    server: ServerOpt = None,
    token: TokenOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """The job's own log lines, newest last."""
    with cli_errors(), api_client(server, token) as client:
        setup_logging(log_level)
        body = client.get(f"/api/v2/jobs/{job_id}/logs/", limit=limit)
        if as_json:
            print_json(body)
            return
        for line in log_lines(body.get("logs") or []):
            out.print(line)


def gather_inspection(client: ApiClient, job_id: int) -> dict[str, Any]:
    """Everything ``job inspect`` shows, in one dict (also its --json output)."""
    view = client.get(f"/api/v2/jobs/{job_id}/")
    # NATS consumer stats: delivered, ack floor, pending, ack pending, redelivered.
    view["queue"] = client.get(f"/api/v2/jobs/{job_id}/queue/").get("consumer")
    reserved = client.get(f"/api/v2/jobs/{job_id}/images/", state="reserved", limit=PAGE)
    failed = client.get(f"/api/v2/jobs/{job_id}/images/", state="failed", limit=PAGE)
    redelivered = client.get(f"/api/v2/jobs/{job_id}/images/", redelivered=1, limit=PAGE)
    logs_body = client.get(f"/api/v2/jobs/{job_id}/logs/", limit=20)
    return {
        "job": view,
        "leases": reserved.get("results") or [],
        "failed": failed.get("results") or [],
        "redelivered": redelivered.get("results") or [],
        "logs": logs_body.get("logs") or [],
    }


@job_app.command("inspect")
def inspect(
    job_id: JobIdArg,
    as_json: JsonOpt = False,
    server: ServerOpt = None,
    token: TokenOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """One screen about a job: leases held, failures with reasons, redeliveries, recent log."""
    with cli_errors(), api_client(server, token) as client:
        setup_logging(log_level)
        data = gather_inspection(client, job_id)
        if as_json:
            print_json(data)
        else:
            out.print(inspection_view(data))


def register(app: typer.Typer) -> None:
    """Add ``trapline job``."""
    app.add_typer(job_app, name="job")
