"""API tokens: stored hashed; a token belongs to one project (or all, for admins) and a role."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from trapline.errors import InvalidRequest, NotFound
from trapline.ledger.models import Project, Role, Token, utcnow


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """The caller behind a token."""

    token_id: int
    name: str
    role: Role
    project_id: int | None  # None: every project

    def can_see(self, project_id: int) -> bool:
        return self.project_id is None or self.project_id == project_id


async def create_token(session: AsyncSession, name: str, role: str, project_id: int | None) -> str:
    """Create a token and return its key (shown once; only its hash is stored)."""
    try:
        role_value = Role(role)
    except ValueError as exc:
        raise InvalidRequest(f"role must be admin or worker, got {role!r}") from exc
    if project_id is not None and await session.get(Project, project_id) is None:
        raise NotFound(f"project {project_id} not found")
    key = "tl_" + secrets.token_urlsafe(30)
    session.add(
        Token(
            name=name,
            key_hash=hash_key(key),
            role=role_value.value,
            project_id=project_id,
            created_at=utcnow(),
        )
    )
    await session.flush()
    return key


async def lookup(session: AsyncSession, key: str) -> Principal | None:
    token = await session.scalar(select(Token).where(Token.key_hash == hash_key(key)))
    if token is None:
        return None
    return Principal(token.id, token.name, Role(token.role), token.project_id)
