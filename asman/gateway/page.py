"""The browser page: plain HTML, JavaScript and CSS from ``asman/gateway/static``.

The page reads the job from the URL hash in compute-queues' format (``#?job=…&queue=…``),
so only ``/`` (and the short link ``/j/<id>``) serve it; every other unknown path is a JSON 404.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from aiohttp import web

__all__ = ["STATIC_FILES", "page", "static_file"]

STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}


def _static_dir() -> Path:
    return Path(str(resources.files("asman.gateway") / "static"))


async def page(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(
        _static_dir() / "index.html",
        headers={"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-cache"},
    )


async def static_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    ctype = STATIC_FILES.get(name)
    if ctype is None:
        raise web.HTTPNotFound()
    return web.FileResponse(
        _static_dir() / name,
        headers={"Content-Type": f"{ctype}; charset=utf-8", "Cache-Control": "no-cache"},
    )
