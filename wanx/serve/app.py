"""The HTTP layer: OpenAI's Videos API shape on FastAPI, the web UI, bearer auth, errors as envelopes.

Routes under ``/v1`` need ``Authorization: Bearer <key>`` when the server has a key; ``/`` (the
page, which asks for the key itself), ``/static`` and ``/health`` do not. Blocking work (SQLite,
image decoding) runs in the thread pool, so one slow upload never stalls the event loop.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..version import __version__
from .errors import ApiError, envelope
from .service import VideoService
from .store import Job
from .uploads import BodyLimit

STATIC = Path(__file__).resolve().parent / "static"
# The page loads only its own script and style; videos play from blob: URLs the script makes.
PAGE_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
                                           "script-src 'self'; style-src 'self'; frame-ancestors 'none'"}
VARIANTS = {"video": "video/mp4", "thumbnail": "image/webp", "spritesheet": "image/webp"}
FORM_LIMITS = dict(max_files=2, max_fields=64, max_part_size=1 << 20)  # text fields; files are capped by size


def video_object(service: VideoService, job: Job) -> dict[str, Any]:
    """A job as OpenAI's ``Video`` object, plus wanx's fields (settings, recipe, prompt extension)."""
    s = job.summary
    recipe = job.recipe or {k: v for k, v in s.items() if k not in ("video_size", "fps", "seconds")}
    return {"id": job.id, "object": "video", "model": service.model_name, "status": job.status,
            "progress": service.progress(job), "created_at": int(job.created_at),
            "completed_at": int(job.completed_at) if job.completed_at else None, "expires_at": None,
            "error": job.error, "prompt": s.get("prompt"), "seconds": s.get("seconds"), "size": s.get("video_size"),
            "remixed_from_video_id": None,
            # wanx's own fields
            "task": s.get("task"), "seed": s.get("seed"), "negative_prompt": s.get("negative_prompt"),
            "frame_num": s.get("frame_num"), "fps": s.get("fps"), "sample_steps": s.get("sample_steps"),
            "attempts": job.attempts, "recipe": recipe, "prompt_extend": job.extend}


def create_app(service: VideoService) -> FastAPI:
    """The ASGI app for ``service``."""
    app = FastAPI(title="wanx", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=service.config.max_body_bytes)
    _add_error_handlers(app)
    app.include_router(_api_router(service), prefix="/v1", dependencies=[Depends(_auth(service.config.api_key))])
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    @app.get("/health")
    def health():
        return JSONResponse(service.health())

    return app


def _auth(key: str | None):
    expected = f"Bearer {key}".encode() if key else None

    def check(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):  # constant time: no key guessing by timing
            raise ApiError(401, "a valid API key is required: Authorization: Bearer <key>",
                           headers={"WWW-Authenticate": "Bearer"})
    return check


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return JSONResponse(envelope(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = str(first.get("loc", ["", "?"])[-1])
        return JSONResponse(envelope(400, f"{param}: {first.get('msg', 'invalid value')}", param=param,
                                     code="invalid_value"), status_code=400)


async def _read_fields(request: Request) -> tuple[list[tuple[str, Any]], Any]:
    """(fields as sent, the form to close afterwards) from a multipart, urlencoded or JSON body."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form(**FORM_LIMITS)
        return list(form.multi_items()), form
    if kind == "application/json":
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the JSON body must be an object of fields")
        return list(body.items()), None
    raise ApiError(415, f"send multipart/form-data or application/json, not {kind or 'no content type'!r}")


def _api_router(service: VideoService) -> APIRouter:
    router = APIRouter()

    def with_poll(job: Job) -> JSONResponse:
        headers = {"openai-poll-after-ms": str(service.poll_after_ms(job))} if job.status in ("queued", "in_progress") else {}
        return JSONResponse(video_object(service, job), headers=headers)

    @router.post("/videos")
    async def create_video(request: Request):
        fields, form = await _read_fields(request)
        try:
            job = await run_in_threadpool(service.submit, fields)
        finally:
            if form is not None:
                await form.close()
        return with_poll(job)

    @router.get("/videos")
    def list_videos(after: str | None = None, limit: int = 20, order: str = "desc"):
        if not 1 <= limit <= 100:
            raise ApiError(400, f"limit must be in [1, 100], got {limit}", param="limit")
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order must be asc or desc, got {order!r}", param="order")
        jobs, more = service.store.page(after=after, limit=limit, order=order)
        data = [video_object(service, j) for j in jobs]
        # A JSONResponse of plain dicts: FastAPI's generic encoder walked every recipe key (50 ms a page).
        return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None, "has_more": more})

    @router.get("/videos/{video_id}")
    def retrieve_video(video_id: str):
        return with_poll(service.get(video_id))

    @router.get("/videos/{video_id}/content")
    def video_content(video_id: str, variant: str = "video"):
        if variant not in VARIANTS:
            raise ApiError(400, f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}", param="variant")
        job = service.get(video_id)
        if job.status != "completed":
            raise ApiError(409, f"video {video_id} is {job.status}; its content exists once it is completed",
                           code="video_not_ready")
        path = service.data.job_path(job.id, variant)
        if not path.is_file():
            raise ApiError(404, f"video {video_id} has no {variant}", param="variant")
        suffix = path.name.split(".", 1)[1]
        return FileResponse(path, media_type=VARIANTS[variant], filename=f"{job.id}.{suffix}",
                            content_disposition_type="inline")

    @router.delete("/videos/{video_id}")
    def delete_video(video_id: str):
        service.delete(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    _add_info_routes(router, service)
    return router


def _add_info_routes(router: APIRouter, service: VideoService) -> None:
    @router.get("/models")
    def models():
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "owned_by": "wanx",
                                            "task": service.facts.spec.name}]}

    @router.get("/loras")
    def loras():
        return {"object": "list", "data": [{"name": n} for n in service.loras()]}

    @router.get("/server")
    def server_info():
        from .ui import ui_facts

        return ui_facts(service)

    @router.post("/prompts/extend")
    async def extend(request: Request):
        fields, form = await _read_fields(request)
        if form is not None:
            await form.close()
        body = dict(fields)
        unknown = set(body) - {"prompt", "image", "lang"}
        if unknown:
            name = sorted(unknown)[0]
            raise ApiError(400, f"unknown field {name!r}; known: prompt, image, lang", param=name)
        return await run_in_threadpool(service.extend, body.get("prompt"), body.get("image"), body.get("lang"))
