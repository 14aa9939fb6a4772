"""A migrated database per test, and a second engine on it (another server's connection)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.ledger import Ledger, counts_by_scan, counts_kept, every_job
from trapline.ledger.db import create_engine, open_database, session_factory


@pytest.fixture
async def ledger(database_url: str) -> AsyncIterator[Ledger]:
    """The ledger; after the test, every job's kept counts must match its rows: each
    transition a test drives also checks the triggers that count it."""
    async with open_database(database_url) as (engine, sessions):
        ledger = Ledger(engine, sessions)
        yield ledger
        for job_id in await every_job(ledger):
            assert await counts_kept(ledger, job_id) == await counts_by_scan(ledger, job_id)


@pytest.fixture
async def other(ledger: Ledger, database_url: str) -> AsyncIterator[Ledger]:
    """A second engine on the same database: another server's connection."""
    engine = create_engine(database_url)
    try:
        yield Ledger(engine, session_factory(engine))
    finally:
        await engine.dispose()
