"""Fixtures of the chaos suite: subprocess bookkeeping, the fault proxy, measured times."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.processes import Processes

# Measured times of this session's scenarios, printed at the end and, when
# TRAPLINE_CHAOS_TIMES names a file, appended to it as JSON lines.
MEASUREMENTS: list[dict[str, Any]] = []


@pytest.fixture
async def procs(tmp_path: Path) -> AsyncIterator[Processes]:
    """Subprocesses of one test; each stopped by pid afterwards (SIGTERM, then SIGKILL)."""
    processes = Processes(tmp_path / "procs")
    try:
        yield processes
    finally:
        await processes.stop_all()
        # Shown by pytest only when the test failed: where each log is, and its end.
        for proc in processes.started:
            print(f"---- {proc.name} (exit {proc.returncode}): {proc.log_path}")
            print(proc.log_tail(30))


@pytest.fixture
def proxies() -> Iterator[Callable[..., FaultProxy]]:
    """``proxies((host, port), seed=...)`` starts a FaultProxy stopped after the test."""
    started: list[FaultProxy] = []

    def make(upstream: tuple[str, int], seed: int = 0) -> FaultProxy:
        proxy = FaultProxy(upstream, seed=seed).start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


@pytest.fixture
def measure(request: pytest.FixtureRequest) -> Iterator[Callable[..., None]]:
    """``measure(name=value, ...)`` records key times/counts of a scenario."""
    record: dict[str, Any] = {"test": request.node.name}

    def add(**values: Any) -> None:
        record.update(values)
        print("chaos measure:", json.dumps(values, default=str))

    yield add
    if len(record) > 1:
        MEASUREMENTS.append(record)
        path = os.environ.get("TRAPLINE_CHAOS_TIMES")
        if path:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, default=str) + "\n")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not MEASUREMENTS:
        return
    terminalreporter.section("chaos measurements")
    for record in MEASUREMENTS:
        values = ", ".join(f"{k}={v}" for k, v in record.items() if k != "test")
        terminalreporter.write_line(f"{record['test']}: {values}")
