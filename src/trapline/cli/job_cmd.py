"""``trapline job …``: create, follow and manage jobs through the server's job API."""

from __future__ import annotations

import csv
import io
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from trapline.cli.client import (
    EXIT_UNREACHABLE,
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

job_app = typer.Typer(help="Create, follow and manage jobs.", no_args_is_help=True)

FINISHED = ("SUCCESS", "FAILURE", "REVOKED")
STATES = ("queued", "reserved", "done", "failed")
STAGE_NAMES = {"collect": "Collect", "process": "Process", "results": "Results"}
# Images fetched per request when the CLI pages through a job's ledger rows.
PAGE = 10_000
RESULTS_PAGE = 10_000

JobIdArg = Annotated[int, typer.Argument(help="Job id.", min=1)]


# ── formatting helpers ─────────────────────────────────────────────────────────


def parse_time(value: Any) -> datetime | None:
    """An ISO time of the API as an aware datetime (None when absent or unreadable)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def short_time(value: Any, fmt: str = "%Y-%m-%d %H:%M:%SZ") -> str:
    """``2026-11-28 14:00:05Z`` from an API time, ``-`` when absent."""
    parsed = parse_time(value)
    return parsed.strftime(fmt) if parsed else "-"


def ago(value: Any, now: datetime | None = None) -> str:
    """How long ago an API time was, in a short human form."""
    parsed = parse_time(value)
    if parsed is None:
        return "never"
    seconds = ((now or datetime.now(UTC)) - parsed).total_seconds()
    if seconds < 0:
        return f"in {-seconds:.0f} s"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def status_style(status: str) -> str:
    return {
        "SUCCESS": "bold green",
        "FAILURE": "bold red",
        "REVOKED": "bold yellow",
        "CANCELING": "yellow",
        "STARTED": "bold cyan",
    }.get(status, "bold")


def counts_line(counts: dict[str, Any]) -> str:
    """``120 images: 10 queued · 16 reserved · 90 done · 4 failed``."""
    parts = " · ".join(f"{int(counts.get(s, 0))} {s}" for s in STATES)
    return f"{int(counts.get('total', 0))} images: {parts}"


def params_text(stage: dict[str, Any]) -> str:
    return ", ".join(
        f"{p.get('name', p.get('key'))} {p.get('value')}" for p in stage.get("params") or []
    )


def print_json(data: Any) -> None:
    """JSON on stdout, plain (no markup, no wrapping) so tools can read it."""
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def job_summary(view: dict[str, Any]) -> RenderableType:
    """The readable summary of a job view: status, counts, detections, waiting, errors."""
    status = str(view.get("status", "?"))
    counts: dict[str, Any] = view.get("counts") or {}
    progress = (view.get("progress") or {}).get("summary", {}).get("progress", 0.0)
    threshold = view.get("failure_threshold")
    head = Text.assemble(
        (f"job {view.get('id')}", "bold"),
        f" {view.get('name', '')!r} · pipeline {view.get('pipeline_slug')} · ",
        (status, status_style(status)),
        f" ({float(progress or 0.0):.0%})",
    )
    lines: list[RenderableType] = [head]
    total = int(counts.get("total", 0)) or 1
    failed_share = int(counts.get("failed", 0)) / total
    tail = f" (failed {failed_share:.1%}"
    tail += f", threshold {float(threshold):.0%})" if threshold is not None else ")"
    lines.append(Text(counts_line(counts) + tail))
    lines.append(Text(f"detections: {view.get('detections', 0)}"))
    times = f"created {short_time(view.get('created_at'))}"
    if view.get("started_at"):
        times += f" · started {short_time(view.get('started_at'))}"
    if view.get("finished_at"):
        times += f" · finished {short_time(view.get('finished_at'))}"
    if view.get("deadline_at"):
        times += f" · deadline {short_time(view.get('deadline_at'))}"
    lines.append(Text(times, style="dim"))
    if view.get("waiting"):
        lines.append(Text(f"waiting: {view['waiting']}", style="yellow"))
    errors = (view.get("progress") or {}).get("errors") or []
    if errors:
        lines.append(Text("recent errors:", style="red"))
        lines.extend(Text(f"  - {e}") for e in errors[-5:])
    if isinstance(view.get("queue"), dict):
        lines.append(queue_text(view["queue"]))
    return Group(*lines)


def queue_text(queue: dict[str, Any]) -> Text:
    """NATS consumer stats when the server includes them in the view."""
    parts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in queue.items())
    return Text(f"queue: {parts}", style="dim")


def finished_exit(view: dict[str, Any]) -> int:
    """0 for SUCCESS, 1 for any other finished status."""
    return 0 if view.get("status") == "SUCCESS" else 1


# ── manifests ──────────────────────────────────────────────────────────────────


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """Images from a manifest: JSON list of {id,url} (or of URLs), CSV with id,url, or URL lines."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise CliError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CliError(f"manifest {path} is not UTF-8 text") from None
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" or stripped.startswith(("[", "{")):
        return _json_manifest(path, text)
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise CliError(f"manifest {path} lists no images")
    header = [h.strip().lower() for h in next(csv.reader([lines[0]]))]
    if path.suffix.lower() == ".csv" or "url" in header:
        return _csv_manifest(path, lines, header)
    return [{"url": ln.strip()} for ln in lines]


def _json_manifest(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise CliError(f"manifest {path} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        data = data["images"]
    if not isinstance(data, list):
        raise CliError(f"manifest {path}: expected a JSON list of {{id, url}} objects")
    images: list[dict[str, Any]] = []
    for n, item in enumerate(data, start=1):
        if isinstance(item, str):
            images.append({"url": item})
        elif isinstance(item, dict) and "url" in item:
            image: dict[str, Any] = {"url": item["url"]}
            if item.get("id") is not None:
                image["id"] = str(item["id"])
            images.append(image)
        else:
            raise CliError(f"manifest {path}: item {n} is not a URL or an object with 'url'")
    return images


def _csv_manifest(path: Path, lines: list[str], header: list[str]) -> list[dict[str, Any]]:
    if "url" not in header:
        raise CliError(f"manifest {path}: CSV needs a 'url' column (and optionally 'id')")
    url_at = header.index("url")
    id_at = header.index("id") if "id" in header else None
    images: list[dict[str, Any]] = []
    for n, row in enumerate(csv.reader(lines[1:]), start=2):
        if len(row) <= url_at:
            raise CliError(f"manifest {path}: row {n} has no url")
        image: dict[str, Any] = {"url": row[url_at].strip()}
        if id_at is not None and len(row) > id_at and row[id_at].strip():
            image["id"] = row[id_at].strip()
        images.append(image)
    return images


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
        if images_dir is not None:
            # The server reads the folder itself; it resolves nothing relative to us.
            body["images_dir"] = str(images_dir.expanduser().resolve())
        else:
            assert manifest is not None
            body["images"] = read_manifest(manifest)
        with api_client(server, token) as client:
            view = client.post("/api/v2/jobs/", body)
        counts = view.get("counts") or {}
        out.print(
            f"created job {view['id']} {view.get('name', '')!r}: {counts.get('total', 0)} images, "
            f"pipeline {view.get('pipeline_slug')}, status {view.get('status')}",
            markup=False,
        )
        typer.echo(view["id"])


def watch(client: ApiClient, job_id: int, interval_s: float = 1.0) -> dict[str, Any]:
    """Live progress bars per stage until the job finishes; returns the final view."""
    progress = Progress(
        TextColumn("{task.description:<8}"),
        BarColumn(bar_width=40),
        TaskProgressColumn(),
        TextColumn("{task.fields[status]:<9} {task.fields[detail]}"),
        console=err,
    )
    tasks: dict[str, TaskID] = {}
    header = Text(f"job {job_id}")
    view: dict[str, Any] = {}
    with Live(Group(header, progress), console=err, refresh_per_second=4, transient=False):
        while True:
            try:
                view = client.get(f"/api/v2/jobs/{job_id}/")
            except CliError as exc:
                if exc.code != EXIT_UNREACHABLE:
                    raise
                # The server restarting or briefly unreachable is no reason to stop watching.
                header.plain = f"job {job_id}: {exc} (retrying)"
                time.sleep(interval_s)
                continue
            status = str(view.get("status"))
            header.plain = ""
            header.append(f"job {job_id} {view.get('name', '')!r} · ")
            header.append(status, status_style(status))
            header.append(f" · {counts_line(view.get('counts') or {})}")
            if view.get("waiting"):
                header.append(f"\n{view['waiting']}", "yellow")
            for stage in (view.get("progress") or {}).get("stages") or []:
                key = str(stage.get("key"))
                if key not in tasks:
                    label = STAGE_NAMES.get(key, str(stage.get("name", key)))
                    tasks[key] = progress.add_task(label, total=1.0, status="", detail="")
                progress.update(
                    tasks[key],
                    completed=float(stage.get("progress") or 0.0),
                    status=str(stage.get("status", "")),
                    detail=params_text(stage),
                )
            if status in FINISHED:
                return view
            time.sleep(interval_s)


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
        table = Table(title=f"{page.get('count', 0)} job(s)", title_justify="left")
        for column in (
            "id",
            "name",
            "pipeline",
            "status",
            "progress",
            "images",
            "failed",
            "created",
        ):
            table.add_column(
                column, justify="right" if column in ("id", "images", "failed") else "left"
            )
        for job in page.get("results") or []:
            counts = job.get("counts") or {}
            summary = (job.get("progress") or {}).get("summary") or {}
            st = str(job.get("status"))
            table.add_row(
                str(job.get("id")),
                escape(str(job.get("name", ""))),
                escape(str(job.get("pipeline_slug", ""))),
                Text(st, status_style(st)),
                f"{float(summary.get('progress') or 0.0):.0%}",
                str(counts.get("total", "")),
                str(counts.get("failed", "")),
                short_time(job.get("created_at"), "%Y-%m-%d %H:%M"),
            )
        out.print(table)


@job_app.command("cancel")
def cancel(
    job_id: JobIdArg,
    server: ServerOpt = None,
    token: TokenOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Stop handing out the job's tasks; results already stored stay."""
    with cli_errors(), api_client(server, token) as client:
        setup_logging(log_level)
        view = client.post(f"/api/v2/jobs/{job_id}/cancel/")
        out.print(f"job {job_id}: {view.get('status')} · {counts_line(view.get('counts') or {})}")


@job_app.command("retry")
def retry(
    job_id: JobIdArg,
    server: ServerOpt = None,
    token: TokenOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Queue the job's failed images again."""
    with cli_errors(), api_client(server, token) as client:
        setup_logging(log_level)
        view = client.post(f"/api/v2/jobs/{job_id}/retry/")
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


def top_label(detection: dict[str, Any]) -> tuple[str, str]:
    classifications = detection.get("classifications") or []
    if not classifications:
        return "", ""
    top = classifications[0]
    scores = top.get("scores") or []
    return str(top.get("classification", "")), f"{max(scores):.2f}" if scores else ""


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
        table = Table(title=f"job {job_id}: {len(detections)} detection(s)", title_justify="left")
        for column in ("image", "#", "x1", "y1", "x2", "y2", "label", "score"):
            table.add_column(column, justify="left" if column in ("image", "label") else "right")
        for d in detections:
            box = d.get("bbox") or {}
            label, score = top_label(d)
            table.add_row(
                escape(str(d.get("image_id"))),
                str(d.get("index")),
                *(f"{float(box.get(k) or 0.0):.0f}" for k in ("x1", "y1", "x2", "y2")),
                escape(label),
                score,
            )
        out.print(table)


def log_lines(entries: list[dict[str, Any]]) -> list[Text]:
    """Job log entries as ``time LEVEL message`` lines."""
    styles = {"ERROR": "red", "CRITICAL": "bold red", "WARNING": "yellow"}
    return [
        Text.assemble(
            (short_time(e.get("at")), "dim"),
            " ",
            (f"{e.get('level', ''):<7}", styles.get(str(e.get("level")), "")),
            " ",
            str(e.get("message", "")),
        )
        for e in entries
    ]


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


def inspection_view(data: dict[str, Any], max_rows: int = 20) -> RenderableType:
    """One screen about a job: summary, leases, failures, redeliveries, recent log lines."""
    parts: list[RenderableType] = [job_summary(data["job"])]
    now = datetime.now(UTC)

    def more(rows: list[Any]) -> list[RenderableType]:
        return (
            [Text(f"… and {len(rows) - max_rows} more", style="dim")]
            if len(rows) > max_rows
            else []
        )

    leases = data["leases"]
    if leases:
        table = Table(title=f"leases held now ({len(leases)})", title_justify="left")
        for column in ("image", "holder", "since", "until", "deliveries"):
            table.add_column(column)
        for r in leases[:max_rows]:
            until = parse_time(r.get("lease_deadline"))
            left = f" ({(until - now).total_seconds():+.0f} s)" if until else ""
            table.add_row(
                escape(str(r.get("image_id"))),
                escape(str(r.get("holder") or "-")),
                ago(r.get("leased_at"), now),
                short_time(r.get("lease_deadline")) + left,
                str(r.get("deliveries")),
            )
        parts += [table, *more(leases)]
    else:
        parts.append(Text("leases held now: none", style="dim"))
    failed = data["failed"]
    if failed:
        table = Table(title=f"failed images ({len(failed)})", title_justify="left")
        for column in ("image", "deliveries", "failed at", "reason"):
            table.add_column(column)
        for r in failed[:max_rows]:
            table.add_row(
                escape(str(r.get("image_id"))),
                str(r.get("deliveries")),
                short_time(r.get("failed_at")),
                escape(str(r.get("reason") or "")),
            )
        parts += [table, *more(failed)]
    else:
        parts.append(Text("failed images: none", style="dim"))
    redelivered = data["redelivered"]
    if redelivered:
        table = Table(title=f"redelivered images ({len(redelivered)})", title_justify="left")
        for column in ("image", "state", "deliveries", "expiries", "holder"):
            table.add_column(column)
        for r in redelivered[:max_rows]:
            table.add_row(
                escape(str(r.get("image_id"))),
                str(r.get("state")),
                str(r.get("deliveries")),
                str(r.get("expiries", "")),
                escape(str(r.get("holder") or "-")),
            )
        parts += [table, *more(redelivered)]
    else:
        parts.append(Text("redelivered images: none", style="dim"))
    parts.append(Text("last log lines:", style="bold"))
    parts.extend(log_lines(data["logs"]) or [Text("  (none)", style="dim")])
    return Group(*parts)


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
