"""What the worker settles with the server before any reserve, and keeps renewed.

The server's capabilities decide which protections are on (lease extension,
release); a plain Antenna server has none. The worker's pipelines are
registered with the project at start-up and again every
``REGISTER_INTERVAL_S``.
"""

from __future__ import annotations

import asyncio
import logging

from trapline.errors import WorkerError
from trapline.pipelines.base import Pipeline
from trapline.settings import WorkerSettings
from trapline.worker.client import ApiError, Capabilities, WorkerClient
from trapline.worker.lifecycle import Halt
from trapline.worker.report import RateLimitedWarning

logger = logging.getLogger(__name__)

REGISTER_INTERVAL_S = 300.0


class Handshake:
    """Capabilities and pipeline registration, with retries that stop when the run halts."""

    def __init__(
        self,
        client: WorkerClient,
        settings: WorkerSettings,
        pipelines: dict[str, Pipeline],
        halt: Halt,
    ) -> None:
        self._client = client
        self.settings = settings
        self._pipelines = pipelines
        self._halt = halt
        self._warn = RateLimitedWarning(logger)

    async def capabilities(self) -> Capabilities:
        """The server's capabilities, retried until it answers; plain Antenna if halted first.

        A refused token raises :class:`~trapline.errors.WorkerError`.
        """
        attempt = 0
        while not self._halt.is_set():
            try:
                return await self._client.capabilities()
            except ApiError as exc:
                if exc.auth_failure:
                    raise WorkerError(
                        f"server {self._client.base_url} refused the token: {exc.detail}"
                    ) from exc
                self._warn(
                    "caps", "server %s not reachable yet (%s); retrying", self._client.base_url, exc
                )
            attempt += 1
            await self._halt.sleep(min(self.settings.delivery_backoff_cap_s, 0.5 * 2**attempt))
        return Capabilities.plain_antenna()

    def warn_missing(self, caps: Capabilities) -> None:
        """Say which protections are off because the server does not offer them."""
        if caps.trapline is None:
            logger.warning(
                "server %s has no trapline capabilities (plain Antenna?): lease extension and "
                "release are off, so tasks held longer than the server's lease may be handed to "
                "another worker, and tasks not processed at shutdown wait out their lease",
                self._client.base_url,
            )
        else:
            missing = [
                name
                for name, on in (
                    ("lease extension", caps.lease_extension),
                    ("release", caps.release),
                )
                if not on
            ]
            if missing:
                logger.warning(
                    "server does not offer %s; those protections are off", " and ".join(missing)
                )

    async def register(self, *, first: bool = False) -> None:
        configs = [p.config() for p in self._pipelines.values()]
        try:
            await self._client.register_pipelines(
                self.settings.project_id, self.settings.service_name, configs
            )
        except ApiError as exc:
            self._warn(
                "register",
                "could not register pipelines with project %s: %s",
                self.settings.project_id,
                exc,
            )
        else:
            if first:
                logger.info(
                    "registered pipelines %s as %r in project %s",
                    ", ".join(self._pipelines),
                    self.settings.service_name,
                    self.settings.project_id,
                )

    async def register_loop(self) -> None:
        while True:
            await asyncio.sleep(REGISTER_INTERVAL_S)
            await self.register()
