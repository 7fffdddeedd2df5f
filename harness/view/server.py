"""`harness view`: a local web server over run folders (aiohttp), a static page (no build step) and a
small JSON API the page reads page by page.

Safe by default: binds 127.0.0.1 unless told otherwise; on loopback, requests whose Host header is not
a loopback name are refused (a web page cannot reach the viewer through DNS rebinding); every answer
carries a Content-Security-Policy that allows only the viewer's own scripts; images come only from the
runs' image roots (:mod:`harness.view.images`); the page inserts every text from results as text.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import threading
from importlib import resources
from pathlib import Path

import orjson
from aiohttp import web

from harness.view import images
from harness.view.index import STATUSES, Filters
from harness.view.runs import ViewRun

STATIC = Path(str(resources.files("harness.view") / "static"))
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
MAX_PER_PAGE = 200


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _json(obj, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS),
                        status=status, content_type="application/json")


class Viewer:
    """The runs and the aiohttp application over them."""

    def __init__(self, folders: list[str | Path], *, image_roots: list[str | Path] = (), rebuild: bool = False,
                 loopback_only: bool = True):
        self.runs = [ViewRun(f, k, image_roots=image_roots, rebuild=rebuild) for k, f in enumerate(folders)]
        names = [r.name for r in self.runs]
        for r in self.runs:
            if names.count(r.name) > 1:
                r.name = str(r.folder)
        self.loopback_only = loopback_only
        self.thumbs = images.Thumbnails()

    # -- helpers
    def _run(self, request: web.Request, key: str = "run") -> ViewRun:
        try:
            k = int(request.query.get(key, "0"))
            return self.runs[k]
        except (ValueError, IndexError):
            raise web.HTTPNotFound(text=f"no run {request.query.get(key)!r}") from None

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        if self.loopback_only:
            host = (request.host or "").rsplit(":", 1)[0] if not (request.host or "").startswith("[") \
                else (request.host or "").split("]")[0] + "]"
            if not _is_loopback(host):
                return web.Response(status=403, text="refused: the viewer answers loopback host names only")
        try:
            resp = await handler(request)
        except web.HTTPException as e:
            self._secure(e)
            raise
        return self._secure(resp)

    @staticmethod
    def _secure(resp):
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    # -- handlers
    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Content-Type": "text/html; charset=utf-8"})

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        p = STATIC / name
        if "/" in name or name.startswith(".") or not p.is_file():
            raise web.HTTPNotFound()
        ctype = {".js": "text/javascript", ".css": "text/css", ".txt": "text/plain"}.get(p.suffix, "text/plain")
        return web.FileResponse(p, headers={"Content-Type": f"{ctype}; charset=utf-8",
                                            "Cache-Control": "max-age=300"})

    async def api_runs(self, request: web.Request) -> web.Response:
        def describe():
            for r in self.runs:
                r.refresh()
            return [r.describe() for r in self.runs]

        return _json({"runs": await self._call(describe), "statuses": STATUSES})

    async def api_tree(self, request: web.Request) -> web.Response:
        run = self._run(request)
        return _json(await self._call(run.tree))

    def _filters(self, request: web.Request, run: ViewRun) -> Filters:
        q = request.query
        f = Filters()
        try:
            if q.get("level"):
                f.level = int(q["level"])
        except ValueError:
            raise web.HTTPBadRequest(text="level must be a number") from None
        st = q.get("status") or None
        if st is not None and st not in STATUSES:
            raise web.HTTPBadRequest(text=f"status must be one of {', '.join(STATUSES)}")
        f.status = st
        f.lraw = q.get("lraw") in ("1", "true")
        f.truth = q.get("truth") or None
        f.item = q.get("item") or None
        if q.get("other") not in (None, ""):
            other = self._run(request, "other")
            if other is not run:
                f.other, f.disagree = other.index, True
        return f

    async def api_questions(self, request: web.Request) -> web.Response:
        run = self._run(request)
        f = self._filters(request, run)
        try:
            page = max(0, int(request.query.get("page", "0")))
            per = min(MAX_PER_PAGE, max(1, int(request.query.get("per", "25"))))
        except ValueError:
            raise web.HTTPBadRequest(text="page and per must be numbers") from None
        out = await self._call(run.questions, f, page, per)
        if f.other is not None:  # the other run's answer beside each row
            other = self.runs[int(request.query["other"])]

            def attach():
                for row in out["rows"]:
                    lines = [ln for ln in other.index.item_lines(str(row["item"]))
                             if ln.get("level") == row["level"] and ln.get("option") == row["option"]]
                    row["other"] = other.row(lines[-1], render=False) if lines else None

            await self._call(attach)
        return _json(out)

    async def api_item(self, request: web.Request) -> web.Response:
        item = request.query.get("item")
        if not item:
            raise web.HTTPBadRequest(text="item is required")
        ids = request.query.get("runs")
        try:
            runs = [self.runs[int(k)] for k in ids.split(",")] if ids else self.runs
        except (ValueError, IndexError):
            raise web.HTTPNotFound(text="unknown run") from None
        per_run = await self._call(lambda: [r.item(item) for r in runs])
        return _json({"item": item, "runs": per_run})

    async def image(self, request: web.Request) -> web.StreamResponse:
        run = self._run(request)
        try:
            root = int(request.query.get("root", "-1"))
            path = images.resolve(run.roots, root, request.query.get("path", ""))
        except (images.Refused, ValueError) as e:
            return web.Response(status=403, text=f"refused: {e}")
        except FileNotFoundError:
            return web.Response(status=404, text="no such image")
        if request.query.get("thumb"):
            try:
                data = await self._call(self.thumbs.get, path)
            except OSError:
                return web.Response(status=415, text="not a readable image")
            return web.Response(body=data, content_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})
        ctype = images.CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
        return web.FileResponse(path, headers={"Content-Type": ctype, "Cache-Control": "max-age=3600"})

    def app(self) -> web.Application:
        a = web.Application(middlewares=[self._guard])
        a.router.add_get("/", self.index)
        a.router.add_get("/static/{name}", self.static)
        a.router.add_get("/api/runs", self.api_runs)
        a.router.add_get("/api/tree", self.api_tree)
        a.router.add_get("/api/questions", self.api_questions)
        a.router.add_get("/api/item", self.api_item)
        a.router.add_get("/img", self.image)
        return a


class ServerThread:
    """The viewer served from a background thread (tests, benchmarks, notebooks)."""

    def __init__(self, viewer: Viewer, host: str = "127.0.0.1", port: int = 0):
        self.viewer, self.host, self.port = viewer, host, port
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, daemon=True, name="harness-view")
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def _main(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as e:  # reported to start()
            self.error = e
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        runner = web.AppRunner(self.viewer.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(30)
        if self.error is not None:
            raise self.error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
