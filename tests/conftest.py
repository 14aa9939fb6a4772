"""Session fixtures: a real nats-server (packaged binary, its own port, temp store) and real
databases (SQLite always; PostgreSQL when TRAPLINE_TEST_DATABASE_URL is set); per test: no
asyncio task outlives the test that started it."""

from __future__ import annotations

import asyncio
import os
import socket
import warnings
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest

from tests.support.databases import fresh_database
from tests.support.servers import RunningServer, start_server
from trapline.queue import EmbeddedNats
from trapline.settings import ServerSettings

PG_URL = os.environ.get("TRAPLINE_TEST_DATABASE_URL")

_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()
_LEFTOVER_GRACE_S = 1.0  # for tasks already on their way out when the test returns
_CANCEL_LIMIT_S = 10.0


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item, so teardown knows whether the test failed."""
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def _describe(task: asyncio.Task[object]) -> str:
    coro = task.get_coro()
    where = getattr(coro, "__qualname__", repr(coro))
    return f"{task.get_name()} ({where})"


@pytest.fixture(autouse=True)
async def no_task_outlives_its_test(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """All tests share one event loop: a task a test leaves running (a worker after a failed
    assertion, say) would go on pulling, posting and logging into the tests after it. After
    each test (and its own fixtures' teardown), every task it started that is still running
    is cancelled and awaited. Tasks running before the test (session fixtures') are left alone.
    A passed test that leaves tasks behind fails in teardown; after a failed test the
    leftovers are expected and only named in a warning."""
    before = asyncio.all_tasks()
    yield
    this = asyncio.current_task()
    left = {t for t in asyncio.all_tasks() - before if t is not this and not t.done()}
    if left:
        # Give tasks that are already finishing (a closed connection's reader) a moment.
        _, left = await asyncio.wait(left, timeout=_LEFTOVER_GRACE_S)
    if not left:
        return
    names = sorted(_describe(t) for t in left)
    for task in left:
        task.cancel()
    _, stuck = await asyncio.wait(left, timeout=_CANCEL_LIMIT_S)
    message = f"{request.node.nodeid} left {len(names)} task(s) running: {', '.join(names)}"
    if stuck:
        message += f"; {len(stuck)} did not stop when cancelled"
    reports = request.node.stash.get(_REPORTS, {})
    if any(r.failed for r in reports.values()):
        warnings.warn(f"{message} (cancelled after the failure)", stacklevel=1)
    else:
        pytest.fail(message)


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port nothing can connect to: bound by this test and never listened on, so a
    connection is refused and no other program can take it while the test runs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        yield int(held.getsockname()[1])


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
        queue_check_interval_s=2.0,
    )


@pytest.fixture
async def server(server_settings: ServerSettings) -> AsyncIterator[RunningServer]:
    """The real server on its own port, in this process, over real HTTP."""
    async with start_server(server_settings) as running:
        yield running


@pytest.fixture
async def short_lease_server(server_settings: ServerSettings) -> AsyncIterator[RunningServer]:
    """The server with a 1 s lease, for tests about expiry and redelivery."""
    settings = server_settings.model_copy(update={"ack_wait_s": 1.0})
    async with start_server(settings) as running:
        yield running
