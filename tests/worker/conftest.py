"""Fixtures for worker tests: a fake worker-API server, settings, test pipelines."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from tests.worker.worker_fakes import FakeAntenna, GatedPipeline, LocalServer


@pytest.fixture
def fake() -> Iterator[FakeAntenna]:
    server = FakeAntenna()
    server.server.start()
    yield server
    server.server.stop()


@pytest.fixture
def local_server() -> Iterator[list[LocalServer]]:
    """Collects LocalServers a test starts, and stops them afterwards."""
    started: list[LocalServer] = []
    yield started
    for server in started:
        server.stop()


@pytest.fixture
def gated() -> Iterator[type[GatedPipeline]]:
    GatedPipeline.gate = threading.Event()
    GatedPipeline.started = threading.Event()
    GatedPipeline.batches = 0
    yield GatedPipeline
    GatedPipeline.gate.set()
