"""Session fixtures: a real nats-server (packaged binary, free port, temp store) and real
databases (SQLite always; PostgreSQL when TRAPLINE_TEST_DATABASE_URL is set)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.databases import fresh_database
from tests.support.servers import RunningServer, start_server
from trapline.queue import EmbeddedNats
from trapline.settings import ServerSettings

PG_URL = os.environ.get("TRAPLINE_TEST_DATABASE_URL")


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    nats = EmbeddedNats(tmp_path_factory.mktemp("nats"))
    nats.start()
    yield nats
    nats.stop()


@pytest.fixture(params=["sqlite", "postgres"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database per test on each backend."""
    if request.param == "postgres" and not PG_URL:
        pytest.skip("PostgreSQL tests need TRAPLINE_TEST_DATABASE_URL")
    async with fresh_database(request.param, tmp_path, PG_URL) as url:
        yield url


@pytest.fixture
def server_settings(database_url: str, nats_server: EmbeddedNats, tmp_path: Path) -> ServerSettings:
    return ServerSettings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        nats_url=nats_server.url,
        ack_wait_s=30.0,
        max_deliver=3,
        reconcile_interval_s=0.2,
    )


@pytest.fixture
async def server(server_settings: ServerSettings) -> AsyncIterator[RunningServer]:
    """The real server on a free port, in this process, over real HTTP."""
    async with start_server(server_settings) as running:
        yield running


@pytest.fixture
async def short_lease_server(server_settings: ServerSettings) -> AsyncIterator[RunningServer]:
    """The server with a 1 s lease, for tests about expiry and redelivery."""
    settings = server_settings.model_copy(update={"ack_wait_s": 1.0})
    async with start_server(settings) as running:
        yield running
