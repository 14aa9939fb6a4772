"""Running ``trapline`` commands against the real server of the ``server`` fixture.

The server runs in the test's event loop, so an HTTP command must run in a thread
(``await cli.run(...)``): called on the loop's thread it would block the server it
talks to.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from typer.testing import CliRunner, Result

from tests.support.servers import RunningServer
from trapline.cli.main import app


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """Unset every TRAPLINE_/AMI_ variable of the calling shell, then apply ``extra``."""
    env: dict[str, str | None] = {
        k: None for k in os.environ if k.startswith(("TRAPLINE_", "AMI_"))
    }
    env.update(extra or {})
    return env


def last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


@dataclass
class Cli:
    """Invokes ``trapline`` in-process; ``server`` adds --server/--token for HTTP commands."""

    server: RunningServer | None = None
    runner: CliRunner = field(default_factory=CliRunner)

    def invoke(self, *args: str, env: Mapping[str, str] | None = None) -> Result:
        return self.runner.invoke(app, list(args), env=clean_env(env), catch_exceptions=True)

    async def run(self, *args: str, env: Mapping[str, str] | None = None) -> Result:
        return await asyncio.to_thread(self.invoke, *args, env=env)

    async def http(self, *args: str, token: str | None = None) -> Result:
        """An HTTP command against the test server (admin token unless given)."""
        assert self.server is not None
        key = token or self.server.admin_token
        return await self.run(*args, "--server", self.server.url, "--token", key)


def assert_one_line_error(result: Result, *fragments: str) -> None:
    """Exit ≠ 0, no traceback, and the fragments on one stderr line."""
    assert result.exit_code != 0, result.output
    # typer.Exit ends as SystemExit (not an Exception); anything else escaped the CLI.
    assert not isinstance(result.exception, Exception), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert any(all(f in ln for f in fragments) for ln in lines), result.stderr
