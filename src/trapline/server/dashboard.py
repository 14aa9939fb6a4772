"""The dashboard for people, and annotated images (an image of a job with its boxes drawn).

- ``GET /dashboard/``: one static page; its script asks for a token once, keeps it in
  the browser (session storage, or local storage when asked to remember it) and calls
  the JSON API with ``Authorization: Token …``. No token ever reaches the HTML.
- ``GET /dashboard/static/{name}``: its CSS and JS (a fixed list of files).
- ``GET /``: redirects to the dashboard.
- ``GET /api/v2/jobs/{job_id}/annotated/{image_id:path}/?max_size=1024&labels=true``:
  the image as JPEG with its detections drawn (404 unknown job or image, 502 source
  not fetchable). Its path does not overlap ``/api/v2/jobs/{job_id}/images/…`` so it
  needs no particular place among the routes.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

import trapline
from trapline.ledger.models import ImageState
from trapline.ledger.queries import image_detections, image_row
from trapline.server import annotate
from trapline.server.api_worker import load_job
from trapline.server.auth import Caller, Ctx
from trapline.server.edge import error

STATIC_DIR = Path(__file__).parent / "static"
_STATIC_TYPES = {
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
}
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; "
        "style-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["dashboard"])


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    return RedirectResponse("/dashboard/", status_code=307)


@router.get("/dashboard/", include_in_schema=False)
async def dashboard_page() -> HTMLResponse:
    page = (STATIC_DIR / "dashboard.html").read_text(encoding="utf-8")
    page = page.replace("{{version}}", html.escape(trapline.__version__))
    return HTMLResponse(page, headers=_PAGE_HEADERS)


@router.get("/dashboard/static/{name}", include_in_schema=False, response_model=None)
async def dashboard_static(name: str) -> FileResponse | JSONResponse:
    media_type = _STATIC_TYPES.get(name)
    if media_type is None:
        return error(404, f"no dashboard file {name!r}")
    return FileResponse(
        STATIC_DIR / name,
        media_type=media_type,
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


@router.get(
    "/api/v2/jobs/{job_id}/annotated/{image_id:path}/",
    tags=["jobs"],
    response_model=None,
    response_class=Response,
    responses={
        200: {"content": {"image/jpeg": {}}, "description": "The image with its boxes drawn."},
        404: {"description": "Unknown job or image, or its file is gone."},
        502: {"description": "The image's URL could not be fetched or decoded."},
    },
)
async def annotated_image(
    job_id: int,
    image_id: str,
    ctx: Ctx,
    caller: Caller,
    max_size: Annotated[int, Query(ge=16, le=4096)] = 1024,
    labels: bool = True,
) -> Response:
    """One image of a job fitted into ``max_size`` pixels (never enlarged), detections drawn.

    Boxes are coloured by label (size classes small/medium/large have fixed colours)
    and, with ``labels``, captioned ``#index label score``.
    """
    job = await load_job(ctx, caller, job_id)
    async with ctx.reads() as session:
        row = await image_row(session, job_id, image_id)
        detections = await image_detections(session, job_id, image_id)
    try:
        jpeg = await annotate.annotated_jpeg(
            url=row.url,
            path=row.path,
            images_dir=job.images_dir,
            boxes=annotate.boxes_of(detections),
            max_size=max_size,
            labels=labels,
        )
    except annotate.SourceNotFound as exc:
        return error(404, f"image {image_id!r} of job {job_id}: {exc}")
    except annotate.SourceUnavailable as exc:
        return error(502, f"image {image_id!r} of job {job_id}: {exc}")
    # A done image's detections never change; any other may still get some.
    cache = "private, max-age=300" if row.state == ImageState.DONE else "no-store"
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": cache})
