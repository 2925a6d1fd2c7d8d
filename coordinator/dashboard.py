"""The coordinator's HTTP face: the live page ``/``, ``/api/status`` (JSON) and ``/metrics`` (Prometheus).

Served by aiohttp on the coordinator's own event loop, so every handler reads the coordinator's
state between two gRPC calls, never during one (``Coordinator`` is single-threaded by design).

Who may read: the page and the JSON carry the whole membership (addresses included), so they need
the run token, or a viewer token that opens only these read-only pages (it is not accepted by the
gRPC service, so a viewer cannot join or report as a node). A token goes in ``Authorization: Bearer
TOKEN`` or, for a browser, the ``?token=`` query (the page reads it from its own address and sends
it with each request). ``/metrics`` needs a token too unless ``metrics_open`` leaves it to a scraper
on a private network. A wrong or missing token gets 401.
"""

from __future__ import annotations

import hmac
import logging
from importlib import resources

from aiohttp import web
from aiohttp.typedefs import Handler

from lowband.coordinator.prometheus import exposition, registry_for
from lowband.coordinator.watch import DEFAULT_EVENTS, RunWatch

logger = logging.getLogger(__name__)

MAX_EVENTS = 1000
PAGE = "dashboard.html"


def _page() -> bytes:
    """The page, installed with the package (setup.py package_data)."""
    return resources.files("lowband.coordinator").joinpath("static").joinpath(PAGE).read_bytes()


def _presented(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header[len("Bearer "):].strip()
    return request.query.get("token", "")


class Dashboard:
    """The aiohttp application and the site it listens on."""

    def __init__(self, watch: RunWatch, token: str, *, viewer_token: str = "", metrics_open: bool = False) -> None:
        if not token:
            raise ValueError("the dashboard needs the run token")
        self.watch = watch
        self._tokens = [t.encode() for t in (token, viewer_token) if t]
        self.metrics_open = metrics_open
        self._registry = registry_for(watch)
        self._page = _page()
        self._runner: web.AppRunner | None = None
        self.host = ""
        self.port = 0
        self.app = web.Application(middlewares=[self._auth])
        self.app.add_routes([web.get("/", self._index), web.get("/api/status", self._status),
                             web.get("/metrics", self._metrics)])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def _allowed(self, request: web.Request) -> bool:
        presented = _presented(request).encode()
        # compare with every token (no early exit): the time taken says nothing about which matched
        return bool(presented) and sum(hmac.compare_digest(presented, t) for t in self._tokens) > 0

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/metrics" and self.metrics_open:
            return await handler(request)
        if not self._allowed(request):
            return web.json_response({"error": "missing or wrong token"}, status=401,
                                     headers={"WWW-Authenticate": 'Bearer realm="lowband"'})
        return await handler(request)

    async def _index(self, request: web.Request) -> web.Response:
        # the token may be in the address: keep it out of Referer headers and caches
        return web.Response(body=self._page, content_type="text/html", charset="utf-8",
                            headers={"Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})

    async def _status(self, request: web.Request) -> web.Response:
        try:
            events = int(request.query.get("events", DEFAULT_EVENTS))
        except ValueError:
            return web.json_response({"error": "events must be an integer"}, status=400)
        doc = self.watch.document(max_events=max(0, min(events, MAX_EVENTS)))
        return web.json_response(doc, headers={"Cache-Control": "no-store"})

    async def _metrics(self, request: web.Request) -> web.Response:
        body = exposition(self._registry)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def start(self, bind: str) -> None:
        """Listen on ``bind`` (HOST:PORT, port 0: any free port); raises OSError if it cannot."""
        host, _, port = bind.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, int(port))
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            self._runner = None
            raise
        self.host = host
        self.port = int(self._runner.addresses[0][1])
        logger.info("dashboard on %s (metrics %s)", self.url, "open" if self.metrics_open else "behind the token")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
