"""``trapline doctor``: is this installation able to run? One line per check, ✓ or ✗."""

from __future__ import annotations

import asyncio
import platform
import subprocess
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import typer
from pydantic import ValidationError
from rich.markup import escape

import trapline
from trapline.cli.client import LogLevelOpt, cli_errors, out, setup_logging
from trapline.settings import ServerSettings

T = TypeVar("T")

# A check that does not answer within this many seconds has failed.
CHECK_TIMEOUT_S = 15.0
SECRET_WORDS = ("password", "secret", "token", "key")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def mask_url(url: str) -> str:
    """A URL with its password (or user info) hidden."""
    from sqlalchemy.engine import make_url

    if "://" not in url:
        return url
    try:
        if url.split("://", 1)[0].split("+", 1)[0] in ("sqlite", "postgresql", "mysql"):
            return make_url(url).render_as_string(hide_password=True)
        parts = urlsplit(url)
        if parts.username or parts.password:
            host = parts.hostname or ""
            port = f":{parts.port}" if parts.port else ""
            return urlunsplit(parts._replace(netloc=f"***@{host}{port}"))
    except ValueError:
        return "***"
    return url


def masked_settings(settings: ServerSettings) -> dict[str, Any]:
    """The settings in effect with secrets masked."""
    shown: dict[str, Any] = {}
    for key, value in settings.model_dump().items():
        if value is not None and any(w in key for w in SECRET_WORDS):
            shown[key] = "***"
        elif isinstance(value, str) and "://" in value:
            shown[key] = mask_url(value)
        else:
            shown[key] = value
    shown["database_url (resolved)"] = mask_url(settings.resolved_database_url())
    return shown


def nats_binary_version() -> tuple[Path | None, str]:
    """(path, version) of the nats-server binary, or (None, why not)."""
    from trapline.errors import ConfigError
    from trapline.queue.embedded import find_nats_server

    try:
        binary = find_nats_server()
    except ConfigError as exc:
        return None, str(exc)
    try:
        done = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{binary} does not run: {exc}"
    if done.returncode != 0:
        return None, f"{binary} --version exited with {done.returncode}"
    version = done.stdout.strip().split()[-1] if done.stdout.strip() else "unknown version"
    return binary, version


def migration_head() -> tuple[str | None, set[str]]:
    """The newest migration revision shipped with this trapline, and every known revision."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from trapline.ledger.db import MIGRATIONS_DIR

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    script = ScriptDirectory.from_config(cfg)
    return script.get_current_head(), {s.revision for s in script.walk_revisions()}


def missing_sqlite_file(url: str) -> Check | None:
    """A check result when the URL names a SQLite file that does not exist yet."""
    from sqlalchemy.engine import make_url

    sql_url = make_url(url)
    if sql_url.get_backend_name() != "sqlite" or sql_url.database in (None, "", ":memory:"):
        return None
    path = Path(str(sql_url.database))
    if path.exists():
        return None
    # Not an error (and doctor must not create it): the server creates it at start.
    shown = mask_url(url)
    parent = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
    if parent is None or not parent.is_dir():
        return Check("database", False, f"{shown}: no existing folder above {path}")
    return Check("database", True, f"{shown}: not created yet (the server creates it)")


async def check_database(settings: ServerSettings) -> Check:
    """Reachable, and at which migration revision."""
    from sqlalchemy import text

    from trapline.ledger.db import create_engine

    url = settings.resolved_database_url()
    shown = mask_url(url)
    head, known = migration_head()
    missing = missing_sqlite_file(url)
    if missing is not None:
        return missing
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            try:
                revision = (
                    await conn.execute(text("SELECT version_num FROM alembic_version"))
                ).scalar()
            except Exception:  # no alembic_version table: a database never migrated
                revision = None
    except Exception as exc:  # any driver error means unreachable; say why in one line
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        return Check("database", False, f"{shown}: {reason[0] if reason else type(exc).__name__}")
    finally:
        await engine.dispose()
    if revision is None:
        return Check("database", True, f"{shown}: reachable, not migrated yet (head {head})")
    if revision not in known:
        return Check(
            "database",
            False,
            f"{shown}: at migration {revision}, unknown to trapline {trapline.__version__} "
            "(made by a newer version?)",
        )
    note = "up to date" if revision == head else f"head is {head}; the server migrates at start"
    return Check("database", True, f"{shown}: reachable, migration {revision} ({note})")


async def check_nats(settings: ServerSettings) -> tuple[Check, str | None]:
    """The configured NATS answers with JetStream, or the embedded binary is there."""
    if not settings.nats_url:
        binary, version = nats_binary_version()
        if binary is None:
            return Check("nats", False, f"no NATS URL set and {version}"), None
        return (
            Check("nats", True, f"embedded nats-server {version} found at {binary}"),
            version,
        )
    import nats

    shown = mask_url(settings.nats_url)

    async def _quiet(_: Exception) -> None:
        """nats-py logs every connection error itself; the check reports it once."""

    try:
        nc = await nats.connect(
            settings.nats_url,
            connect_timeout=settings.nats_connect_timeout_s,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            error_cb=_quiet,
            name="trapline-doctor",
        )
    except Exception as exc:
        return Check("nats", False, f"{shown}: cannot connect: {exc or type(exc).__name__}"), None
    try:
        version = str(nc.connected_server_version)
        try:
            await nc.jetstream().account_info()
        except Exception as exc:
            return (
                Check(
                    "nats", False, f"{shown}: reachable (v{version}) but JetStream is not: {exc}"
                ),
                version,
            )
        return Check("nats", True, f"{shown}: reachable, JetStream enabled (v{version})"), version
    finally:
        await nc.close()


def check_pipelines() -> Check:
    from trapline.pipelines import available_pipelines

    try:
        slugs = sorted(available_pipelines())
    except Exception as exc:  # a broken plugin: report it, keep checking the rest
        return Check("pipelines", False, f"cannot load pipeline plugins: {exc}")
    if not slugs:
        return Check("pipelines", False, "no pipelines installed")
    return Check("pipelines", True, ", ".join(slugs))


async def _timed(name: str, coro: Coroutine[Any, Any, T]) -> T | Check:
    try:
        return await asyncio.wait_for(coro, CHECK_TIMEOUT_S)
    except TimeoutError:
        return Check(name, False, f"no answer within {CHECK_TIMEOUT_S:.0f} s")


async def run_checks(settings: ServerSettings) -> list[Check]:
    """Every check, in display order."""
    database = await _timed("database", check_database(settings))
    nats_result = await _timed("nats", check_nats(settings))
    nats_check, nats_version = (
        nats_result if isinstance(nats_result, tuple) else (nats_result, None)
    )
    if nats_version is None and settings.nats_url:
        binary, found = nats_binary_version()
        nats_version = f"{found} (local binary)" if binary else "unknown"
    versions = Check(
        "versions",
        True,
        f"trapline {trapline.__version__}, python {platform.python_version()}, "
        f"nats-server {nats_version or 'unknown'}",
    )
    return [database, nats_check, versions, check_pipelines()]


def doctor(log_level: LogLevelOpt = None) -> None:
    """Check the database, NATS, versions and settings; exit 1 if something is broken."""
    with cli_errors():
        setup_logging(log_level)
        try:
            settings = ServerSettings()
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            out.print(f"✗ settings: TRAPLINE_{where.upper()}: {first.get('msg')}", markup=False)
            raise typer.Exit(1) from None
        checks = asyncio.run(run_checks(settings))
        for c in checks:
            mark = "[green]✓[/]" if c.ok else "[red]✗[/]"
            out.print(f"{mark} {c.name}: {escape(c.detail)}")
        out.print("settings in effect:", markup=False)
        for key, value in masked_settings(settings).items():
            out.print(f"  {key} = {value}", markup=False)
        broken = [c.name for c in checks if not c.ok]
        if broken:
            out.print(f"[red]broken:[/] {', '.join(broken)}")
            raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``trapline doctor``."""
    app.command("doctor")(doctor)
