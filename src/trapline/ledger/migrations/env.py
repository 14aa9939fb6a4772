"""Alembic environment: always run programmatically with a connection handed in by trapline."""

from __future__ import annotations

from alembic import context

from trapline.ledger.models import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only via trapline.ledger.db.migrate
    raise RuntimeError("run migrations through trapline.ledger.db.migrate()")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
