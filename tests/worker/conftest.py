"""Fixtures for worker tests: the fault proxy in front of the real server, the fake
server where a real one cannot serve the purpose, an image host, test pipelines."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.servers import RunningServer
from tests.worker.fake_antenna import FakeAntenna
from tests.worker.image_host import ImageHost
from tests.worker.local_server import LocalServer
from tests.worker.pipelines import GatedPipeline


@pytest.fixture
def proxy_to() -> Iterator[Callable[[RunningServer], FaultProxy]]:
    """``proxy_to(server)``: a FaultProxy in front of a real server, stopped after the test."""
    started: list[FaultProxy] = []

    def make(server: RunningServer) -> FaultProxy:
        parts = urlsplit(server.url)
        assert parts.hostname is not None and parts.port is not None
        proxy = FaultProxy((parts.hostname, parts.port)).start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


@pytest.fixture
def fake() -> Iterator[FakeAntenna]:
    server = FakeAntenna()
    server.server.start()
    yield server
    server.server.stop()


@pytest.fixture
def image_host() -> Iterator[ImageHost]:
    host = ImageHost().start()
    yield host
    host.stop()


@pytest.fixture
def local_server() -> Iterator[list[LocalServer]]:
    """Collects LocalServers a test starts, and stops them afterwards."""
    started: list[LocalServer] = []
    yield started
    for server in started:
        server.stop()


@pytest.fixture
def gated() -> Iterator[GatedPipeline]:
    """A gated pipeline of this test only; opened at the end so its compute thread ends."""
    pipeline = GatedPipeline()
    yield pipeline
    pipeline.open()
