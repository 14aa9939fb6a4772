"""Token authentication and role/project checks (FastAPI dependencies)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Request

from trapline.errors import AuthError, Forbidden
from trapline.ledger.models import Role
from trapline.ledger.tokens import Principal, lookup
from trapline.server.context import AppContext

_CACHE_TTL_S = 30.0


class TokenCache:
    """Tokens this app already looked up, kept ``ttl_s`` seconds; one per app, so a
    key known to one app's database is never taken on trust by another's."""

    def __init__(self, ttl_s: float = _CACHE_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, Principal]] = {}

    def get(self, key: str, now: float) -> Principal | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] <= now:
            return None
        return entry[1]

    def put(self, key: str, found: Principal, now: float) -> None:
        self._entries[key] = (now + self.ttl_s, found)


def get_ctx(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


Ctx = Annotated[AppContext, Depends(get_ctx)]


async def principal(request: Request, ctx: Ctx) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() not in ("token", "bearer") or not key.strip():
        raise AuthError("missing token: send 'Authorization: Token <key>'")
    key = key.strip()
    now = time.monotonic()
    cached = ctx.tokens.get(key, now)
    if cached is not None:
        return cached
    async with ctx.reads() as session:
        found = await lookup(session, key)
    if found is None:
        raise AuthError("unknown token")
    ctx.tokens.put(key, found, now)
    return found


Caller = Annotated[Principal, Depends(principal)]


async def admin(caller: Caller) -> Principal:
    if caller.role != Role.ADMIN:
        raise Forbidden("this action needs an admin token")
    return caller


Admin = Annotated[Principal, Depends(admin)]


def check_project(caller: Principal, project_id: int) -> None:
    if not caller.can_see(project_id):
        raise Forbidden(f"token {caller.name!r} has no access to project {project_id}")
