"""A migrated database per test, and a second engine on it (another server's connection)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.ledger import Ledger
from trapline.ledger.db import create_engine, open_database, session_factory


@pytest.fixture
async def ledger(database_url: str) -> AsyncIterator[Ledger]:
    async with open_database(database_url) as (engine, sessions):
        yield Ledger(engine, sessions)


@pytest.fixture
async def other(ledger: Ledger, database_url: str) -> AsyncIterator[Ledger]:
    """A second engine on the same database: another server's connection."""
    engine = create_engine(database_url)
    try:
        yield Ledger(engine, session_factory(engine))
    finally:
        await engine.dispose()
