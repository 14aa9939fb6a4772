"""How ``trapline job`` shows jobs: summaries, tables, live progress bars, the inspection view.

Everything here renders what the job API returned; the commands that fetch it
are in :mod:`trapline.cli.job_cmd`.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from trapline.cli.client import EXIT_UNREACHABLE, ApiClient, CliError, err

FINISHED = ("SUCCESS", "FAILURE", "REVOKED")
STATES = ("queued", "reserved", "done", "failed")
STAGE_NAMES = {"collect": "Collect", "process": "Process", "results": "Results"}


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


# ── tables ─────────────────────────────────────────────────────────────────────


def jobs_table(page: dict[str, Any]) -> Table:
    """One page of the job list: id, name, pipeline, status, progress, counts, created."""
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
    return table


def top_label(detection: dict[str, Any]) -> tuple[str, str]:
    classifications = detection.get("classifications") or []
    if not classifications:
        return "", ""
    top = classifications[0]
    scores = top.get("scores") or []
    return str(top.get("classification", "")), f"{max(scores):.2f}" if scores else ""


def results_table(job_id: int, detections: list[dict[str, Any]]) -> Table:
    """A job's detections: image, index, box, top label and its score."""
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
    return table


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


# ── inspection ─────────────────────────────────────────────────────────────────


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


# ── live progress ──────────────────────────────────────────────────────────────


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


def print_json(data: Any) -> None:
    """JSON on stdout, plain (no markup, no wrapping) so tools can read it."""
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
