"""Bounded polling: wait for an observable condition, never for a fixed time."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

POLL_INTERVAL_S = 0.05


@overload
async def until(
    probe: Callable[[], Awaitable[T | None]],
    what: str = ...,
    limit_s: float = ...,
    interval_s: float = ...,
) -> T: ...
@overload
async def until(
    probe: Callable[[], T | None],
    what: str = ...,
    limit_s: float = ...,
    interval_s: float = ...,
) -> T: ...
async def until(
    probe: Callable[[], Any],
    what: str = "condition",
    limit_s: float = 10.0,
    interval_s: float = POLL_INTERVAL_S,
) -> Any:
    """Poll ``probe`` (plain or async) until it returns something truthy; that value.

    AssertionError naming ``what`` once ``limit_s`` has passed; the event loop runs
    between polls, so in-process servers and workers make progress meanwhile.
    """
    deadline = time.monotonic() + limit_s
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {limit_s:g} s waiting for {what}")
        await asyncio.sleep(interval_s)


def wait_until(
    condition: Callable[[], bool],
    what: str = "condition",
    limit_s: float = 10.0,
    interval_s: float = POLL_INTERVAL_S,
) -> None:
    """Poll ``condition`` from synchronous code (threads, subprocesses) until it is true."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {limit_s:g} s waiting for {what}")
        time.sleep(interval_s)
