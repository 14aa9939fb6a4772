"""``trapline pipelines list``: pipelines installed here, or known to a server."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from trapline.cli.client import (
    CliError,
    JsonOpt,
    LogLevelOpt,
    TokenOpt,
    api_client,
    cli_errors,
    out,
    setup_logging,
)
from trapline.cli.job_views import ago, print_json, short_time
from trapline.errors import PipelineError

pipelines_app = typer.Typer(help="Pipelines installed here or registered on a server.")


def local_pipelines() -> list[dict[str, Any]]:
    """The pipelines installed in this Python environment (entry points)."""
    from trapline.pipelines import available_pipelines

    try:
        classes = available_pipelines()
    except PipelineError as exc:
        raise CliError(str(exc)) from None
    except ImportError as exc:  # a plugin whose dependencies are missing
        raise CliError(f"a pipeline plugin failed to import: {exc}") from None
    return [
        {
            "slug": slug,
            "name": cls.name,
            "version": cls.version,
            "description": cls.description,
            "needs_pixels": cls.needs_pixels,
        }
        for slug, cls in sorted(classes.items())
    ]


def first_line(text: Any) -> str:
    return str(text or "").strip().splitlines()[0] if str(text or "").strip() else ""


@pipelines_app.command("list")
def list_pipelines(
    server: Annotated[
        str | None,
        typer.Option("--server", help="Ask this server instead of listing local pipelines."),
    ] = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
    log_level: LogLevelOpt = None,
) -> None:
    """Installed pipelines; with --server, the server's pipelines and processing services."""
    with cli_errors():
        setup_logging(log_level)
        if server is None:
            pipelines = local_pipelines()
            if as_json:
                print_json({"pipelines": pipelines})
                return
            table = Table(title="pipelines installed here", title_justify="left")
            for column in ("slug", "name", "version", "description"):
                table.add_column(column)
            for p in pipelines:
                table.add_row(
                    escape(p["slug"]),
                    escape(p["name"]),
                    str(p["version"]),
                    escape(first_line(p["description"])),
                )
            out.print(table)
            return
        with api_client(server, token) as client:
            body = client.get("/api/v2/pipelines/")
        if as_json:
            print_json(body)
            return
        table = Table(title=f"pipelines on {server}", title_justify="left")
        for column in ("slug", "name", "version", "description"):
            table.add_column(column)
        for p in body.get("pipelines") or []:
            table.add_row(
                escape(str(p.get("slug"))),
                escape(str(p.get("name", ""))),
                str(p.get("version", "")),
                escape(first_line(p.get("description"))),
            )
        out.print(table)
        now = datetime.now(UTC)
        services = Table(title="processing services", title_justify="left")
        for column in ("id", "name", "project", "pipelines", "last seen"):
            services.add_column(column)
        for s in body.get("processing_services") or []:
            services.add_row(
                str(s.get("id")),
                escape(str(s.get("name"))),
                str(s.get("project_id")),
                escape(", ".join(s.get("pipelines") or [])),
                f"{ago(s.get('last_seen_at'), now)} ({short_time(s.get('last_seen_at'))})",
            )
        out.print(services)


def register(app: typer.Typer) -> None:
    """Add ``trapline pipelines``."""
    app.add_typer(pipelines_app, name="pipelines")
