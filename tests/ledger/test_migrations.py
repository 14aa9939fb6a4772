"""Migrations build exactly the schema the models describe, on every backend."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from trapline.ledger.db import create_engine, migrate
from trapline.ledger.models import Base


async def test_migrations_match_the_models_and_seed_the_default_project(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await migrate(engine)
        await migrate(engine)  # idempotent: a second server start changes nothing
        async with engine.connect() as conn:
            diff = await conn.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c), Base.metadata)
            )
            projects = (await conn.execute(text("SELECT id, name FROM projects"))).all()
    finally:
        await engine.dispose()
    assert diff == []
    assert [tuple(p) for p in projects] == [(1, "default")]
