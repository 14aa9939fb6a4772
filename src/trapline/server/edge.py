"""The HTTP edge: errors mapped to statuses once, body limits, path normalization."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, IntegrityError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trapline.errors import (
    AuthError,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    QueueError,
    QueueUnavailable,
    TraplineError,
)

log = logging.getLogger(__name__)

_STATUS: list[tuple[type[TraplineError], int]] = [
    (AuthError, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (InvalidRequest, 422),
    (QueueUnavailable, 503),
    (QueueError, 503),
]


class FastJSONResponse(JSONResponse):
    """JSON by orjson, for a body a route returns with ``response_model=None``: FastAPI
    would walk it with ``jsonable_encoder`` (60x slower; 370 ms for 10,000 detections).
    Routes with a return type already take FastAPI's own fast path, and making this the
    app's default response class would take them off it. Like that path it writes
    non-finite floats as null; it writes datetimes as ISO 8601 (views send strings)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


def error(status: int, detail: str, **extra: Any) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"detail": detail, **extra}, status_code=status, headers=headers)


async def read_json(request: Request) -> Any:
    """The request body as JSON; malformed JSON is a 400 naming the problem."""
    raw = await request.body()
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise MalformedJSON(f"malformed JSON body: {exc}") from exc


class MalformedJSON(TraplineError):
    """Raised when a request body is not valid JSON."""


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TraplineError)
    async def _trapline(_: Request, exc: TraplineError) -> JSONResponse:
        if isinstance(exc, MalformedJSON):
            return error(400, str(exc))
        if isinstance(exc, QueueUnavailable):
            return error(503, "task queue temporarily unavailable")
        for cls, status in _STATUS:
            if isinstance(exc, cls):
                if isinstance(exc, InvalidRequest) and exc.errors:
                    return error(status, str(exc), errors=exc.errors)
                return error(status, str(exc))
        log.exception("unmapped error", exc_info=exc)
        return error(500, str(exc))

    @app.exception_handler(ValidationError)
    async def _model_validation(_: Request, exc: ValidationError) -> JSONResponse:
        return _invalid(exc.errors())

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _invalid(exc.errors())

    @app.exception_handler(IntegrityError)
    async def _integrity(_: Request, exc: IntegrityError) -> JSONResponse:
        return error(409, "conflicting change: " + str(exc.orig).splitlines()[0][:200])

    @app.exception_handler(DBAPIError)
    async def _db(_: Request, exc: DBAPIError) -> JSONResponse:
        log.warning("database error: %s", str(exc).splitlines()[0])
        return error(503, "database temporarily unavailable")


def _invalid(errors: Sequence[Any]) -> JSONResponse:
    if any(e.get("type") == "json_invalid" for e in errors):
        return error(400, "malformed JSON body")
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    cleaned = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors
    ]
    return error(422, f"invalid request: {where}: {first.get('msg', '')}", errors=cleaned)


class EdgeMiddleware:
    """Adds the trailing slash Antenna's clients sometimes omit, and enforces the body limit."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path.startswith("/api/") and not path.endswith("/"):
            scope = dict(scope, path=path + "/", raw_path=(path + "/").encode())
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await _send_413(send, self.max_body_bytes)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_413(send, self.max_body_bytes)


class _TooLarge(Exception):
    pass


async def _send_413(send: Send, limit: int) -> None:
    body = json.dumps({"detail": f"request body exceeds the limit of {limit} bytes"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
