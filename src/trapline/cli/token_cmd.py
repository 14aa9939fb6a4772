"""``trapline token create``: API tokens, made directly on the configured database."""

from __future__ import annotations

import asyncio
import enum
from typing import Annotated

import typer

from trapline.cli.client import CliError, LogLevelOpt, cli_errors, out, setup_logging
from trapline.errors import TraplineError
from trapline.settings import ServerSettings

token_app = typer.Typer(help="Manage API tokens (works on the database directly).")


class RoleChoice(enum.StrEnum):
    ADMIN = "admin"
    WORKER = "worker"


def db_error_line(url: str, exc: BaseException) -> str:
    """One line for a database failure, without the password."""
    from sqlalchemy.engine import make_url

    shown = make_url(url).render_as_string(hide_password=True)
    first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"database {shown}: {first[0] if first else type(exc).__name__}"


async def make_token(url: str, name: str, role: str, project_id: int | None) -> str:
    """Create a token on the database at ``url`` (migrating it first) and return its key."""
    # Imported here: SQLAlchemy and Alembic cost ~0.3 s, which every `trapline` call would pay.
    from sqlalchemy.exc import SQLAlchemyError

    from trapline.ledger.db import open_database
    from trapline.ledger.tokens import create_token

    try:
        async with open_database(url) as (_, sessions), sessions() as session, session.begin():
            return await create_token(session, name, role, project_id)
    except TraplineError as exc:
        raise CliError(str(exc)) from None
    except (SQLAlchemyError, OSError) as exc:
        raise CliError(db_error_line(url, exc)) from None


@token_app.command("create")
def create(
    name: Annotated[str, typer.Option(help="A name that says who or what uses the token.")],
    role: Annotated[RoleChoice, typer.Option(help="admin: manage jobs; worker: process them.")],
    project: Annotated[
        int | None,
        typer.Option(help="Project the token is limited to (default: all projects).", min=1),
    ] = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Create a token and print it as the last line (it is shown only once)."""
    with cli_errors():
        setup_logging(log_level)
        settings = ServerSettings()
        if not name.strip():
            raise CliError("--name must not be empty")
        url = settings.resolved_database_url()
        key = asyncio.run(make_token(url, name.strip(), role.value, project))
        scope = f"project {project}" if project is not None else "all projects"
        out.print(f"created {role.value} token {name.strip()!r} for {scope}", markup=False)
        typer.echo(key)


def register(app: typer.Typer) -> None:
    """Add ``trapline token``."""
    app.add_typer(token_app, name="token")
