"""Fresh databases per test: a SQLite file, or a new PostgreSQL database dropped afterwards."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]


def _dsn(sqlalchemy_url: str, database: str | None = None) -> str:
    dsn = sqlalchemy_url.replace("postgresql+asyncpg://", "postgresql://")
    if database is not None:
        dsn = dsn.rsplit("/", 1)[0] + "/" + database
    return dsn


def admin_dsn(sqlalchemy_url: str) -> str:
    """A DSN on the server's maintenance database, to administer a test database."""
    return _dsn(sqlalchemy_url, "postgres")


@asynccontextmanager
async def fresh_database(kind: str, tmp_path: Path, pg_url: str | None) -> AsyncIterator[str]:
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
        return
    assert pg_url
    name = f"trapline_t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(_dsn(pg_url))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield pg_url.rsplit("/", 1)[0] + "/" + name
    finally:
        admin = await asyncpg.connect(_dsn(pg_url))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
