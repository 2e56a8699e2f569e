"""The annotation server: server-rendered shell pages (an annotator's batches, a task page, the
admin page) and the JSON API the task page talks to (README, "Annotation"), over the functions of
tasks/annotate.py. FastAPI because it is small, typed and already installed with Prefect; pages
are plain Jinja2 with one vanilla script, so nothing is built and nothing comes from the network.

Auth: the personal link /a/<token> sets the HttpOnly, SameSite=Strict cookie `tia2_token`; every
request takes that cookie or `Authorization: Bearer <token>`. An annotator reads and writes only
their own queue and the images of its items; /admin and /api/admin/* need an admin's token.
"""

from __future__ import annotations

import json
import logging
import re
import socket
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tasks import annotate
from tasks.agreement import compute_agreement
from tia2.annotation import AnswerError
from tia2.errors import UserError
from tia2.store import Store

HERE = Path(__file__).resolve().parent
COOKIE = "tia2_token"
MAX_BODY = 64 * 1024  # an answer is a few hundred bytes; anything near this is not one
MAX_PRELOAD = 10  # items per /next request
IMAGE_ID = re.compile(r"[0-9A-Za-z_-]{1,128}")
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                 b"connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),  # the personal link holds the token
    (b"x-frame-options", b"DENY"),
]
NO_STORE = (b"cache-control", b"no-store")


def create_app(store: Store) -> FastAPI:
    """The app over `store`: its answers go through one AnswerWriter (group commit), closed with
    the app."""
    writer = annotate.AnswerWriter(store)

    @asynccontextmanager
    async def lifespan(_app):
        try:
            yield
        finally:
            writer.close()

    # no /docs: Swagger's page loads its script from a CDN; the README documents the API
    app = FastAPI(title="tia2 annotation", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")

    def caller(request: Request):
        """The annotator whose token the request carries: 401 without one or with a forged one."""
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else request.cookies.get(COOKIE)
        if not token:
            raise HTTPException(401, "no token: open your personal link")
        who = annotate.authenticate(store, token)
        if who is None:
            raise HTTPException(401, "this token is not valid: ask for a new personal link")
        return who

    def admin(who=Depends(caller)):
        if who.role != "admin":
            raise HTTPException(403, "the admin pages need the admin's link")
        return who

    def own_batch(batch: str, who):
        """The caller's progress in `batch`: 404 when it is not one of theirs (whether it exists
        is not theirs to know)."""
        for progress in annotate.annotator_batches(store, who.annotator_id):
            if progress["batch"] == batch:
                return progress
        raise HTTPException(404, f"no batch {batch!r} in your queue")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        """JSON for the API and images, a short page for a person at a page."""
        if request.url.path.startswith(("/api/", "/images/")):
            return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)
        return templates.TemplateResponse(request, "message.html", {"title": f"Error {exc.status_code}",
                                                                    "message": exc.detail}, exc.status_code)

    # --- pages ----------------------------------------------------------------------------
    @app.get("/a/{token}")
    def personal_link(token: str):
        who = annotate.authenticate(store, token)
        if who is None:
            raise HTTPException(401, "this link is not valid: ask for a new one")
        response = RedirectResponse("/admin" if who.role == "admin" else "/", status_code=303)
        response.set_cookie(COOKIE, token, max_age=365 * 24 * 3600, httponly=True, samesite="strict", path="/")
        return response

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request, who=Depends(caller)):
        if who.role == "admin":
            return RedirectResponse("/admin", status_code=303)
        batches = annotate.annotator_batches(store, who.annotator_id)
        return templates.TemplateResponse(request, "home.html", {"who": who, "batches": batches})

    @app.get("/batches/{batch}", response_class=HTMLResponse)
    def task_page(request: Request, batch: str, who=Depends(caller)):
        progress = own_batch(batch, who)
        return templates.TemplateResponse(request, "task.html", {"who": who, "progress": progress})

    @app.get("/admin", response_class=HTMLResponse)
    def admin_page(request: Request, who=Depends(admin)):
        rows = progress_rows()
        batches = sorted({row["batch"] for row in rows})
        agreement = {batch: agreement_rows(batch) for batch in batches}
        return templates.TemplateResponse(request, "admin.html", {"who": who, "rows": rows, "agreement": agreement})

    # --- the JSON API -----------------------------------------------------------------------
    @app.get("/api/me")
    def me(who=Depends(caller)):
        return {"name": who.name, "role": who.role}

    @app.get("/api/batches")
    def batches(who=Depends(caller)):
        return annotate.annotator_batches(store, who.annotator_id)

    @app.get("/api/batches/{batch}/next")
    def next_items(batch: str, count: int = Query(2, ge=1, le=MAX_PRELOAD), who=Depends(caller)):
        progress = own_batch(batch, who)
        items = annotate.next_items(store, batch, who.annotator_id, count)
        return {"items": [item_json(view) for view in items], "done": progress["done"], "total": progress["total"]}

    @app.post("/api/batches/{batch}/answers")
    async def answer(batch: str, request: Request, who=Depends(caller)):
        body = await json_body(request)
        if not isinstance(body, dict) or set(body) != {"item", "answer"} or not isinstance(body["item"], str):
            raise HTTPException(422, 'the body must be {"item": <item id>, "answer": {...}}')
        try:
            saved = await run_in_threadpool(writer.submit, who, batch, body["item"], body["answer"], "app")
        except AnswerError as exc:
            raise HTTPException(422, str(exc)) from exc
        except PermissionError as exc:  # not an item of the caller's queue
            raise HTTPException(403, str(exc)) from exc
        except UserError as exc:  # no such batch
            raise HTTPException(404, str(exc)) from exc
        progress = await run_in_threadpool(own_batch, batch, who)
        return {"saved": True, "changed": saved.changed, "done": progress["done"], "total": progress["total"]}

    @app.post("/api/batches/{batch}/undo")
    async def undo(batch: str, request: Request, who=Depends(caller)):
        await json_body(request, required=False)  # the size limit holds for every body
        try:
            item = await run_in_threadpool(writer.undo, who, batch)  # only ever the caller's own answers
        except UserError as exc:
            raise HTTPException(404, str(exc)) from exc
        progress = await run_in_threadpool(own_batch, batch, who)
        return {"item": item, "done": progress["done"], "total": progress["total"]}

    @app.get("/images/{image_id}")
    def image(image_id: str, who=Depends(caller)):
        # An id is looked up, never joined to a path: only files of the images table are served,
        # and only those of the caller's items.
        if not IMAGE_ID.fullmatch(image_id) or not annotate.may_see_image(store, who.annotator_id, image_id):
            raise HTTPException(404, "no such image in your queue")
        try:
            path = annotate.image_file(store, image_id)
        except UserError as exc:
            raise HTTPException(404, str(exc)) from exc
        return FileResponse(path, headers={"cache-control": "private, max-age=3600"})

    @app.get("/api/admin/progress")
    def admin_progress(who=Depends(admin)):
        return progress_rows()

    @app.get("/api/admin/agreement")
    def admin_agreement(batch: str, who=Depends(admin)):
        return agreement_rows(batch)

    def progress_rows() -> list[dict]:
        return records(annotate.progress(store))

    def agreement_rows(batch: str) -> list[dict]:
        """The batch's agreement as it stands (tasks/agreement.py): [] before its first answers."""
        try:
            annotate.batch_info(store, batch)
        except UserError as exc:
            raise HTTPException(404, str(exc)) from exc
        try:
            return records(compute_agreement(store, batch).table)
        except UserError:  # no answers yet
            return []

    return app


def records(frame) -> list[dict]:
    """A frame's rows as JSON-ready dicts (nulls as None, numpy numbers as Python's)."""
    return json.loads(frame.to_json(orient="records"))


def item_json(view) -> dict:
    return {"item": view.item, "task": view.task, "prompt": view.prompt,
            "images": [{"image_id": i, "url": f"/images/{i}"} for i in view.image_ids],
            "settings": view.settings}


async def json_body(request: Request, required: bool = True):
    """The request's JSON body, read at most MAX_BODY bytes far: 413 past that, 422 when it is
    not JSON (or missing where `required`)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise HTTPException(413, f"the body is over {MAX_BODY // 1024} KiB")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY:
            raise HTTPException(413, f"the body is over {MAX_BODY // 1024} KiB")
    if not data and not required:
        return None
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HTTPException(422, f"the body is not JSON: {exc}") from exc


class SecurityHeaders:
    """Headers on every response: a strict Content-Security-Policy (the pages load only their own
    script, style and images), no sniffing, no framing, no referrer; nothing but static files and
    images is cached."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cached = scope["path"].startswith(("/static/", "/images/"))

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                headers += [h for h in SECURITY_HEADERS if h[0] not in names]
                if not cached and b"cache-control" not in names:
                    headers.append(NO_STORE)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _HideTokens(logging.Filter):
    """Keeps personal links' tokens out of the access log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) >= 3 and isinstance(record.args[2], str):
            record.args = (*record.args[:2], re.sub(r"^/a/[^/?]+", "/a/<token>", record.args[2]), *record.args[3:])
        return True


def listening_socket(host: str = "127.0.0.1", port: int = 8765) -> socket.socket:
    """The app's socket, bound and listening now (this machine only unless told otherwise), so that
    a taken port or an unknown address is one line before anything is written; `serve` answers on it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them (its default backlog)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve(store: Store, sock: socket.socket) -> None:
    """Run the app with uvicorn on a bound socket (`listening_socket`) until interrupted."""
    import uvicorn

    config = uvicorn.Config(create_app(store), log_level="info")
    logging.getLogger("uvicorn.access").addFilter(_HideTokens())  # after Config, which sets up logging
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
