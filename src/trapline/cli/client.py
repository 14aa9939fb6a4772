"""What the CLI commands share: options, one-line errors, logging set-up and the HTTP client.

Every expected failure ends as one readable line on stderr and a non-zero exit
code (:func:`fail`); tracebacks are kept for bugs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn
from urllib.parse import quote

import httpx
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from trapline.cli.logs import configure_logging
from trapline.settings import ClientSettings

# One console per stream. Logs, progress bars and errors go to stderr so that
# stdout carries only what scripts read (ids, tokens, JSON, tables).
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)

EXIT_ERROR = 1
EXIT_UNREACHABLE = 2
# How many offending items of a 422 answer are named in the error line.
MAX_ERRORS_SHOWN = 3

ServerOpt = Annotated[
    str | None,
    typer.Option(
        "--server",
        help="Server base URL (default: TRAPLINE_SERVER_URL or http://127.0.0.1:8000).",
        show_default=False,
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", help="API token (default: TRAPLINE_TOKEN).", show_default=False),
]
LogLevelOpt = Annotated[
    str | None,
    typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the raw JSON answer.")]


class CliError(Exception):
    """An expected failure: reported as one line, exit code ``code``."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print ``error: message`` on stderr and leave with ``code``."""
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn CliError into its line; Ctrl-C into a short note and exit 130."""
    try:
        yield
    except CliError as exc:
        fail(str(exc), exc.code)
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None


def setup_logging(level: str | None, default: str = "WARNING", *, rich: bool = True) -> None:
    """Configure logging once; log lines share the stderr console with progress bars."""
    chosen = (level or default).upper()
    if chosen not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        fail(f"--log-level must be DEBUG, INFO, WARNING or ERROR, got {level!r}", 2)
    configure_logging(chosen, rich=rich)
    # Share the stderr console the progress bars use, so log lines don't tear them.
    for handler in logging.getLogger().handlers:
        if isinstance(handler, RichHandler):
            handler.console = err


def detail_line(status: int, body: Any, fallback: str, index_base: int = 0) -> str:
    """A readable line from an error answer: its detail, then the first offending items.

    ``index_base`` is the place of the request's first image in the whole list (a page
    of a manifest), so offending images are named by their place in the manifest.
    """
    detail = fallback
    errors: list[Any] = []
    if isinstance(body, dict):
        detail = str(body.get("detail") or fallback)
        raw = body.get("errors")
        if isinstance(raw, list):
            errors = [_rebased(e, index_base) for e in raw]
    line = f"server answered {status}: {detail}"
    if errors:
        shown = "; ".join(_describe_error(e) for e in errors[:MAX_ERRORS_SHOWN])
        more = (
            f" (and {len(errors) - MAX_ERRORS_SHOWN} more)"
            if len(errors) > MAX_ERRORS_SHOWN
            else ""
        )
        line += f" — {shown}{more}"
    return line


def _rebased(e: Any, index_base: int) -> Any:
    if index_base and isinstance(e, dict) and isinstance(e.get("index"), int):
        return {**e, "index": e["index"] + index_base}
    return e


def _describe_error(e: Any) -> str:
    if not isinstance(e, dict):
        return str(e)
    if "reason" in e:  # an offending image of a job's image list
        index = e.get("index")
        position = int(index) + 1 if isinstance(index, int) else None
        where = f"image {e.get('id')!r}" if e.get("id") is not None else "image"
        if position is not None and str(e.get("id")) != str(position):
            where += f" (item {position})"  # the id alone does not say where it is
        return f"{where}: {e['reason']}"
    loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
    return f"{loc}: {e.get('msg', '')}" if loc else str(e.get("msg", e))


def path_part(value: str) -> str:
    """An id for a URL path (image ids may be relative paths: keep their slashes)."""
    return quote(value, safe="/")


class ApiClient:
    """A small synchronous client for the job API: token header, JSON, one-line errors."""

    def __init__(self, server_url: str, token: str, timeout_s: float = 30.0) -> None:
        if not token:
            raise CliError("no token: pass --token or set TRAPLINE_TOKEN", EXIT_ERROR)
        self.base_url = server_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Token {token}", "User-Agent": "trapline-cli"},
            timeout=timeout_s,
        )

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        index_base: int = 0,
        timeout_s: float | None = None,
    ) -> httpx.Response:
        """Send a request; a transport failure or an error status raises CliError.

        ``index_base``: see :func:`detail_line`; ``timeout_s`` overrides the client's.
        """
        timeout = httpx.USE_CLIENT_DEFAULT if timeout_s is None else timeout_s
        try:
            response = self._http.request(method, path, params=params, json=json, timeout=timeout)
        except httpx.TimeoutException:
            raise CliError(
                f"server at {self.base_url} did not answer in time", EXIT_UNREACHABLE
            ) from None
        except httpx.TransportError as exc:
            raise CliError(
                f"cannot reach server at {self.base_url}: {exc or type(exc).__name__}",
                EXIT_UNREACHABLE,
            ) from None
        if response.status_code >= 400:
            try:
                body: Any = response.json()
            except ValueError:
                body = None
            fallback = response.reason_phrase or "error"
            code = EXIT_UNREACHABLE if response.status_code >= 500 else EXIT_ERROR
            raise CliError(detail_line(response.status_code, body, fallback, index_base), code)
        return response

    def get(self, path: str, **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v is not None}
        return self.request("GET", path, params=clean).json()

    def post(
        self, path: str, body: Any = None, *, index_base: int = 0, timeout_s: float | None = None
    ) -> Any:
        return self.request(
            "POST",
            path,
            json=body if body is not None else {},
            index_base=index_base,
            timeout_s=timeout_s,
        ).json()

    def get_text(self, path: str, **params: Any) -> str:
        clean = {k: v for k, v in params.items() if v is not None}
        return self.request("GET", path, params=clean).text


def client_settings(server: str | None, token: str | None) -> ClientSettings:
    """Flags over TRAPLINE_SERVER_URL / TRAPLINE_TOKEN."""
    overrides: dict[str, Any] = {}
    if server:
        overrides["server_url"] = server
    if token:
        overrides["token"] = token
    return ClientSettings(**overrides)


def api_client(server: str | None, token: str | None) -> ApiClient:
    """An ApiClient from flags and settings."""
    settings = client_settings(server, token)
    return ApiClient(settings.server_url, settings.token)
