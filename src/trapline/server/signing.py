"""Signed, expiring URLs for images the server itself serves (workers download without a token)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from urllib.parse import quote

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from trapline.ledger.models import ServerSecret


class UrlSigner:
    def __init__(self, key: bytes, ttl_s: int) -> None:
        self._key = key
        self.ttl_s = ttl_s

    def _sig(self, job_id: int, image_id: str, expires: int) -> str:
        msg = f"{job_id}\n{image_id}\n{expires}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    def url(self, base_url: str, job_id: int, image_id: str) -> str:
        expires = int(time.time()) + self.ttl_s
        sig = self._sig(job_id, image_id, expires)
        return (
            f"{base_url.rstrip('/')}/api/v2/files/{job_id}/{quote(image_id, safe='')}"
            f"?expires={expires}&sig={sig}"
        )

    def verify(self, job_id: int, image_id: str, expires: int, sig: str) -> bool:
        if expires < time.time():
            return False
        # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError, a 500).
        return hmac.compare_digest(self._sig(job_id, image_id, expires).encode(), sig.encode())


async def load_secret(sessions: async_sessionmaker[AsyncSession], name: str, nbytes: int) -> str:
    """A value shared by every replica: created once in the database, then read."""
    async with sessions() as session:
        row = await session.get(ServerSecret, name)
        if row is None:
            session.add(ServerSecret(name=name, value=secrets.token_hex(nbytes)))
            try:
                await session.commit()
            except IntegrityError:
                await session.rollback()  # another replica created it first
        value = await session.scalar(select(ServerSecret.value).where(ServerSecret.name == name))
    assert value is not None
    return value


async def load_signer(sessions: async_sessionmaker[AsyncSession], ttl_s: int) -> UrlSigner:
    return UrlSigner(bytes.fromhex(await load_secret(sessions, "url_signing_key", 32)), ttl_s)


async def load_installation_id(sessions: async_sessionmaker[AsyncSession]) -> str:
    """Names this database's queue resources apart from any other sharing the NATS."""
    return await load_secret(sessions, "installation_id", 4)
