"""A folder job's images, served by signed URL: intact, only with a valid signature, never
from outside the job's folder, and without touching the database per download."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from tests.server.test_database_outage import _set_connections
from tests.server.test_worker_api import reserve
from tests.support.polling import until
from tests.support.servers import RunningServer, start_server
from trapline.server.signing import UrlSigner, load_signer
from trapline.settings import ServerSettings

JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4


async def folder_job(server: RunningServer, folder: Path) -> dict[str, Any]:
    async with server.client() as admin:
        r = await admin.post("/api/v2/jobs/", json={"pipeline": "null", "images_dir": str(folder)})
    assert r.status_code == 201, r.text
    return dict(r.json())


async def signed_urls(server: RunningServer, job_id: int, n: int) -> dict[str, str]:
    """image id → the URL a worker's reserve hands out."""
    async with server.worker_client() as w:
        tasks = await reserve(w, job_id, n)
    assert len(tasks) == n
    return {t["image_id"]: t["image_url"] for t in tasks}


async def signer_of(server: RunningServer, ttl_s: int = 3600) -> UrlSigner:
    """A signer holding the server's own key, as a second replica would load it."""
    return await load_signer(server.ctx.sessions, ttl_s)


@pytest.fixture
def night(tmp_path: Path) -> Path:
    """A camera folder with a small JPEG, a big TIFF, and a secret file next to it."""
    folder = tmp_path / "night"
    (folder / "cam1").mkdir(parents=True)
    (folder / "cam1" / "a.jpg").write_bytes(JPEG)
    (folder / "big.tif").write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    (tmp_path / "secret.jpg").write_bytes(b"\xff\xd8 not for workers")
    return folder


async def test_images_download_intact_with_their_type_and_length_small_and_big(
    server: RunningServer, night: Path
) -> None:
    job = await folder_job(server, night)
    urls = await signed_urls(server, job["id"], 2)
    async with httpx.AsyncClient(timeout=30) as anonymous:
        small = await anonymous.get(urls["cam1/a.jpg"])
        big = await anonymous.get(urls["big.tif"])
        head = await anonymous.head(urls["big.tif"])
    assert small.status_code == 200 and small.content == JPEG
    assert small.headers["content-type"] == "image/jpeg"
    assert small.headers["content-length"] == str(len(JPEG))
    assert big.status_code == 200 and big.content == (night / "big.tif").read_bytes()
    assert big.headers["content-type"] == "image/tiff"
    assert big.headers["content-length"] == str(3 * 1024 * 1024 + 7)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(3 * 1024 * 1024 + 7)


async def test_a_tampered_foreign_or_expired_signature_is_refused_with_403(
    server: RunningServer, night: Path
) -> None:
    job = await folder_job(server, night)
    urls = await signed_urls(server, job["id"], 2)
    good = urls["cam1/a.jpg"]
    base, query = good.split("?")
    expires = query.split("&")[0].removeprefix("expires=")
    sig = query.split("sig=")[1]
    expired = (await signer_of(server, ttl_s=-60)).url(server.url, job["id"], "cam1/a.jpg")
    refused = {
        "tampered": good.replace("sig=", "sig=0"),
        "another image's": urls["big.tif"].split("?")[0] + "?" + query,
        "extended": f"{base}?expires={int(expires) + 3600}&sig={sig}",
        "expired": expired,
        "missing": base,
        "non-numeric expiry": f"{base}?expires=soon&sig={sig}",
        "non-ASCII": f"{base}?expires={expires}&sig=%C3%A9{sig[2:]}",
    }
    async with httpx.AsyncClient(timeout=30) as anonymous:
        assert (await anonymous.get(good)).status_code == 200
        for what, url in refused.items():
            r = await anonymous.get(url)
            assert r.status_code == 403, f"{what} signature: {r.status_code} {r.text}"
            assert r.json()["detail"] == "invalid or expired signature"


async def test_even_a_validly_signed_name_never_reaches_outside_the_job_s_folder(
    server: RunningServer, night: Path, tmp_path: Path
) -> None:
    (night / "cam1" / "link-out.jpg").symlink_to(tmp_path / "secret.jpg")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "secret.jpg").write_bytes(b"\xff\xd8 not for workers either")
    (night / "cam2").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (night / "link-in.jpg").symlink_to(night / "cam1" / "a.jpg")
    job = await folder_job(server, night)
    # The scan follows links to files, so a link out of the folder is in the job.
    urls = await signed_urls(server, job["id"], job["counts"]["total"])
    assert {"cam1/link-out.jpg", "link-in.jpg"} <= urls.keys()
    # Names the server never signed, signed with its key all the same (as a leaked key would).
    signer = await signer_of(server)
    forged = {
        name: signer.url(server.url, job["id"], name)
        for name in [
            "../secret.jpg",
            "cam1/../../secret.jpg",
            str(tmp_path / "secret.jpg"),
            "cam2/secret.jpg",
        ]
    }
    async with httpx.AsyncClient(timeout=30) as anonymous:
        assert (await anonymous.get(urls["link-in.jpg"])).content == JPEG
        r = await anonymous.get(urls["cam1/link-out.jpg"])
        assert r.status_code == 404 and b"not for workers" not in r.content
        for name, url in forged.items():
            assert "%2F" in url  # the traversal travels encoded, past any client's normalizing
            r = await anonymous.get(url)
            assert r.status_code == 404, f"{name}: {r.status_code}"
            assert b"not for workers" not in r.content


def release_a_blocked_reader(fifo: Path) -> None:
    """Lets a server that opened the FIFO and waits for a writer fail this test, not hang."""
    with contextlib.suppress(OSError):  # ENXIO: no reader waiting, the server did not block
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


async def test_a_missing_file_a_folder_or_a_fifo_is_404_without_blocking(
    server: RunningServer, night: Path
) -> None:
    job = await folder_job(server, night)
    urls = await signed_urls(server, job["id"], 2)
    (night / "cam1" / "a.jpg").unlink()
    os.mkfifo(night / "pipe.jpg")  # opening it for reading would wait for a writer
    signer = await signer_of(server)
    async with httpx.AsyncClient(timeout=10) as anonymous:
        gone = await anonymous.get(urls["cam1/a.jpg"])
        folder = await anonymous.get(signer.url(server.url, job["id"], "cam1"))
        other_job = await anonymous.get(signer.url(server.url, job["id"] + 1, "big.tif"))
        try:
            fifo = await anonymous.get(signer.url(server.url, job["id"], "pipe.jpg"))
        finally:
            release_a_blocked_reader(night / "pipe.jpg")
    assert gone.status_code == 404 and gone.json()["detail"] == "image not found"
    assert (folder.status_code, fifo.status_code, other_job.status_code) == (404, 404, 404)


@contextmanager
def statements_run() -> Iterator[list[str]]:
    """Every SQL statement any engine in this process executes meanwhile."""
    seen: list[str] = []

    def note(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    event.listen(Engine, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", note)


@pytest.fixture
async def quiet_server(server_settings: ServerSettings) -> AsyncIterator[RunningServer]:
    """No reconciler sweep after the first one, so any statement is a request's."""
    settings = server_settings.model_copy(update={"reconcile_interval_s": 3600.0})
    async with start_server(settings) as running:
        yield running


def sweeps_done(server: RunningServer) -> float:
    samples = server.ctx.metrics.reconciler_sweep.collect()[0].samples
    return float(next(s.value for s in samples if s.name.endswith("_count")))


async def test_downloads_run_no_database_statement_once_the_job_s_folder_is_known(
    quiet_server: RunningServer, night: Path
) -> None:
    server = quiet_server
    for i in range(20):
        (night / f"{i:02d}.jpg").write_bytes(JPEG)
    job = await folder_job(server, night)
    urls = await signed_urls(server, job["id"], 22)
    await until(lambda: sweeps_done(server) >= 1, "the reconciler's first sweep")
    async with httpx.AsyncClient(timeout=30) as anonymous:
        first = await anonymous.get(urls["cam1/a.jpg"])  # reads the job's folder once
        with statements_run() as during_downloads:
            bodies = [(await anonymous.get(url)).content for url in urls.values()]
    assert first.status_code == 200 and bodies.count(JPEG) == 21
    assert during_downloads == []
    # The same watch sees what a request that does read the ledger runs.
    async with server.client() as admin:
        with statements_run() as during_a_read:
            assert (await admin.get(f"/api/v2/jobs/{job['id']}/")).status_code == 200
    assert during_a_read


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_downloads_go_on_while_the_database_refuses_connections(
    server: RunningServer, database_url: str, night: Path
) -> None:
    job = await folder_job(server, night)
    urls = await signed_urls(server, job["id"], 2)
    async with httpx.AsyncClient(timeout=30) as anonymous:
        assert (await anonymous.get(urls["cam1/a.jpg"])).status_code == 200
        await _set_connections(database_url, allowed=False)
        try:
            async with server.client() as admin:
                ledger = await admin.get(f"/api/v2/jobs/{job['id']}/")
            small = await anonymous.get(urls["cam1/a.jpg"])
            big = await anonymous.get(urls["big.tif"])
        finally:
            await _set_connections(database_url, allowed=True)
    assert ledger.status_code == 503  # the database is really gone
    assert (small.status_code, small.content) == (200, JPEG)
    assert big.status_code == 200 and big.content == (night / "big.tif").read_bytes()


def test_a_signature_with_characters_beyond_ascii_is_refused_not_an_error() -> None:
    signer = UrlSigner(b"k" * 32, ttl_s=60)
    expires = int(signer.url("http://x", 1, "a.jpg").split("expires=")[1].split("&")[0])
    assert signer.verify(1, "a.jpg", expires, "\u00e9" * 64) is False
