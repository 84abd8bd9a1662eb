"""The explorer as a Starlette app: one page, its own static files, and three JSON endpoints.

Routes:

* ``GET /``: the page (Jinja2, autoescaped; the run's description goes in as a JSON data block).
* ``GET /static/...``: the page's own JS and CSS (nothing from any other host; no fonts, no CDN).
* ``POST /api/photo``: a multipart form with one file field ``photo``, at most ``max_upload_bytes``
  (checked on the declared length and again while reading, 413 with a message otherwise); the file goes
  to a private temporary folder and through the same image reader as ``predict`` (400 with its one-line
  message when it is not a usable picture).
* ``GET /api/test?index=N``: test image N (bounds-checked, 400 otherwise).
* ``GET /api/channel?layer=NAME&channel=C``: a channel's (or class's) maximum stimulus and the training
  images that excite it most.
* ``GET /api/info``: the run's description.

Model work runs in Starlette's thread pool (``run_in_threadpool``) behind the explorer's one lock, so the
event loop keeps serving while a picture is explained. Every answer carries a Content-Security-Policy
that allows this origin only (and data:/blob: images), and a request whose Host is not one of the names the
server was started for is refused: a page on another site cannot reach the explorer through DNS rebinding.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import CifarlabError
from .core import Explorer, ExploreSettings, display_name

HERE = Path(__file__).resolve().parent
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
FORM_OVERHEAD = 64 * 1024            # multipart boundaries and part headers around the photo
DRAIN_BYTES = 64 * 1024 * 1024       # an oversized body is read and dropped up to this, so the client gets the 413
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
CSP = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class UploadTooLarge(Exception):
    def __init__(self, size: int, finished: bool):
        super().__init__(size)
        self.size, self.finished = size, finished  # finished: the message that crossed the limit was the last


def create_app(run=None, *, explorer: Explorer | None = None, data_dir=None, settings: ExploreSettings | None = None,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, hosts=LOOPBACK_NAMES, log=print):
    """The explorer's ASGI app for a run folder (or a ready :class:`Explorer`). ``hosts``: the Host header
    names it answers to (None: any, for ``--allow-remote``)."""
    from starlette.applications import Starlette
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    explorer = explorer or Explorer.open(run, data_dir=data_dir, settings=settings, log=log)
    page = render_page(explorer, max_upload_bytes)
    api = _Api(explorer, max_upload_bytes)
    routes = [Route("/", api.page_handler(page)), Route("/api/info", api.info),
              Route("/api/photo", api.photo, methods=["POST"]), Route("/api/test", api.test),
              Route("/api/channel", api.channel), Mount("/static", StaticFiles(directory=HERE / "static"))]
    app = Starlette(routes=routes, lifespan=_closing(explorer))
    app.state.explorer = explorer
    return _Guard(app, hosts)


def _closing(explorer: Explorer):
    """The app's lifespan: when the server stops, the explorer's background work stops too."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            from starlette.concurrency import run_in_threadpool

            await run_in_threadpool(explorer.close)
    return lifespan


def render_page(explorer: Explorer, max_upload_bytes: int) -> str:
    import jinja2

    from .render import colormap_bytes

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    config = dict(explorer.info(), max_upload_bytes=max_upload_bytes, colormap=colormap_bytes())
    return env.get_template("explore.html").render(info=config, config=config)


def _error(message: str, status: int = 400):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


def _megabytes(n: int) -> str:
    return f"{n / 1024 ** 2:.1f} MB"


class _Api:
    def __init__(self, explorer: Explorer, max_upload_bytes: int):
        self.explorer, self.max_upload_bytes = explorer, max_upload_bytes

    def page_handler(self, page: str):
        from starlette.responses import HTMLResponse

        async def handler(request):
            return HTMLResponse(page)
        return handler

    async def info(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse(self.explorer.info())

    async def test(self, request):
        return await self._answer(self.explorer.explain_test, request.query_params.get("index", ""))

    async def channel(self, request):
        q = request.query_params
        return await self._answer(self.explorer.channel, q.get("layer", ""), q.get("channel", ""))

    async def photo(self, request):
        from starlette.exceptions import HTTPException
        from starlette.formparsers import MultiPartException
        from starlette.requests import Request

        limit = self.max_upload_bytes + FORM_OVERHEAD
        declared = request.headers.get("content-length", "")
        if declared.isdecimal() and int(declared) > limit:
            return await self._too_large(request, int(declared), drain=int(declared) <= limit + DRAIN_BYTES)
        counted = Request(request.scope, _capped(request.receive, limit))
        try:
            async with counted.form(max_files=1, max_fields=8) as form:
                upload = form.get("photo")
                if upload is None or isinstance(upload, str):
                    return _error("send the picture as a multipart form file field named 'photo'")
                name = display_name(form_filename(getattr(upload, "filename", None) or "upload"))
                size = upload.size if upload.size is not None else -1
                if size > self.max_upload_bytes:
                    return self._too_large_answer(size)
                return await self._answer(self._explain_upload, upload.file, name)
        except UploadTooLarge as e:
            return await self._too_large(request, e.size, drain=not e.finished)
        except (HTTPException, MultiPartException) as e:
            return _error(f"the upload is not a readable multipart form ({getattr(e, 'detail', e)}); send the "
                          f"picture as a file field named 'photo'")

    def _explain_upload(self, source, name: str) -> dict:
        """Copy the (spooled) upload into a private folder (mode 0700) and explain it from there: the image
        reader takes a path, and the copy never outlives the request."""
        folder = Path(tempfile.mkdtemp(prefix="cifarlab-explore-"))
        try:
            path = folder / "upload"
            source.seek(0)
            with open(path, "xb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            return self.explorer.explain_file(path, name)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    async def _too_large(self, request, size: int, drain: bool):
        """Read and drop the rest of the body (bounded), so the client reads the 413 instead of a reset."""
        if drain:
            dropped = 0
            while dropped <= DRAIN_BYTES:
                message = await request.receive()
                dropped += len(message.get("body", b""))
                if message["type"] != "http.request" or not message.get("more_body", False):
                    break
        return self._too_large_answer(size)

    def _too_large_answer(self, size: int):
        return _error(f"the upload is more than {_megabytes(self.max_upload_bytes)} (at least {_megabytes(size)}); "
                      f"the explorer takes pictures up to {_megabytes(self.max_upload_bytes)} "
                      f"(cifarlab explore --max-upload-mb)", 413)

    async def _answer(self, work, *args):
        """``work(*args)`` off the event loop; a user's mistake is a 400 with its message, anything else a
        500 with one line (logged), and the server goes on serving."""
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse

        try:
            return JSONResponse(await run_in_threadpool(work, *args))
        except CifarlabError as e:
            return _error(str(e))
        except Exception as e:  # noqa: BLE001 - a bug must not stop the server; say what it was
            print(f"error: explore: {type(e).__name__}: {e}", file=sys.stderr)
            return _error(f"the explorer failed on this request ({type(e).__name__}: {e}); it keeps serving", 500)


def form_filename(name: str) -> str:
    """A multipart filename as the user named the file: browsers send '"', CR and LF as %22, %0D and %0A
    (the HTML standard's form-data encoding)."""
    return name.replace("%22", '"').replace("%0D", "\r").replace("%0A", "\n")


def _capped(receive, limit: int):
    """``receive`` that counts the body's bytes and raises UploadTooLarge past ``limit`` (a chunked body
    declares no length, so the count is the check)."""
    total = 0

    async def counted():
        nonlocal total
        message = await receive()
        if message["type"] == "http.request":
            total += len(message.get("body", b""))
            if total > limit:
                raise UploadTooLarge(total, finished=not message.get("more_body", False))
        return message
    return counted


def host_of(headers) -> str:
    """The host name of a Host header value (without the port; IPv6 without its brackets)."""
    value = headers.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class _Guard:
    """ASGI middleware: the Host check (DNS rebinding) and the security headers on every answer."""

    HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
               (b"referrer-policy", b"no-referrer"), (b"cache-control", b"no-store")]

    def __init__(self, app, hosts):
        self.app = app
        self.hosts = None if hosts is None else {h.lower() for h in hosts}

    @property
    def state(self):
        return self.app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = host_of(headers.get(b"host", b"").decode("latin-1"))
        if self.hosts is not None and host not in self.hosts:
            body = json.dumps({"error": f"this explorer answers to {', '.join(sorted(self.hosts))} only, not to "
                                        f"{display_name(host)!r}"}).encode()
            await send({"type": "http.response.start", "status": 421,
                        "headers": [(b"content-type", b"application/json"), *self.HEADERS]})
            return await send({"type": "http.response.body", "body": body})

        async def secured(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), *self.HEADERS])
            await send(message)
        return await self.app(scope, receive, secured)
