"""``trapline image show``: one image of a job, with its full history."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from trapline.cli.client import (
    JsonOpt,
    LogLevelOpt,
    ServerOpt,
    TokenOpt,
    api_client,
    cli_errors,
    out,
    path_part,
    setup_logging,
)
from trapline.cli.job_views import log_lines, print_json, short_time, top_label

image_app = typer.Typer(help="Look at single images of a job.", no_args_is_help=True)

STATE_STYLES = {"done": "green", "failed": "red", "reserved": "cyan", "queued": "yellow"}


def image_view(job_id: int, data: dict[str, Any]) -> RenderableType:
    """The ledger row, the history (newest last) and the detections of one image."""
    state = str(data.get("state"))
    parts: list[RenderableType] = [
        Text.assemble(
            (f"image {data.get('image_id')}", "bold"),
            f" of job {job_id} · ",
            (state, STATE_STYLES.get(state, "bold")),
        )
    ]
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="dim")
    fields.add_column()
    rows: list[tuple[str, str]] = [
        ("url", str(data.get("url") or "-")),
        ("deliveries", str(data.get("deliveries"))),
        ("lease expiries", str(data.get("expiries", "-"))),
        ("holder", str(data.get("holder") or "-")),
        ("holder id", str(data.get("holder_id") or "-")),
        ("leased at", short_time(data.get("leased_at"))),
        ("lease deadline", short_time(data.get("lease_deadline"))),
        ("result at", short_time(data.get("result_at"))),
        ("failed at", short_time(data.get("failed_at"))),
    ]
    if data.get("reason"):
        rows.append(("reason", str(data["reason"])))
    for key, value in rows:
        fields.add_row(key, escape(value))
    parts.append(fields)
    parts.append(Text("history:", style="bold"))
    parts.extend(log_lines(data.get("history") or []) or [Text("  (none)", style="dim")])
    detections = data.get("detections") or []
    if detections:
        table = Table(title=f"{len(detections)} detection(s)", title_justify="left")
        for column in ("#", "x1", "y1", "x2", "y2", "algorithm", "label", "score"):
            table.add_column(column, justify="right" if column[0] in "#xy" else "left")
        for d in detections:
            box = d.get("bbox") or {}
            label, score = top_label(d)
            table.add_row(
                str(d.get("index")),
                *(f"{float(box.get(k) or 0.0):.0f}" for k in ("x1", "y1", "x2", "y2")),
                escape(str(d.get("algorithm") or "")),
                escape(label),
                score,
            )
        parts.append(table)
    else:
        parts.append(Text("detections: none", style="dim"))
    return Group(*parts)


@image_app.command("show")
def show(
    job_id: Annotated[int, typer.Argument(help="Job id.", min=1)],
    image_id: Annotated[str, typer.Argument(help="Image id within the job.")],
    as_json: JsonOpt = False,
    server: ServerOpt = None,
    token: TokenOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """One image's ledger row, full history and detections."""
    with cli_errors(), api_client(server, token) as client:
        setup_logging(log_level)
        data = client.get(f"/api/v2/jobs/{job_id}/images/{path_part(image_id)}/")
        if as_json:
            print_json(data)
        else:
            out.print(image_view(job_id, data))


def register(app: typer.Typer) -> None:
    """Add ``trapline image``."""
    app.add_typer(image_app, name="image")
