"""A webhook receiver for tests: a real aiohttp server on 127.0.0.1 that records every POST,
answers the statuses it is told to (then 200), and verifies signatures with the code
docs/guide.md gives receivers, so that code is tested too."""

from __future__ import annotations

import asyncio
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide.md"


def guide_function(name: str) -> Any:
    """The function ``name`` as docs/guide.md defines it in a fenced Python block."""
    for block in re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S):
        if f"def {name}(" in block:
            scope: dict[str, Any] = {}
            exec(compile(block, f"docs/guide.md ({name})", "exec"), scope)
            return scope[name]
    raise AssertionError(f"docs/guide.md defines no {name}()")


@dataclass(frozen=True)
class Call:
    path: str
    headers: CIMultiDict[str]
    body: bytes
    status: int  # what the receiver answered

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """``failures`` are answered (in order) before the first 200; ``hold``, when given, keeps
    the first request waiting until it is set."""

    def __init__(self, failures: tuple[int, ...] = (), hold: asyncio.Event | None = None) -> None:
        self.failures = list(failures)
        self.hold = hold
        self.calls: list[Call] = []
        self.arrived = asyncio.Event()  # set on every request
        self._delivered: dict[str, asyncio.Queue[Call]] = defaultdict(asyncio.Queue)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{path:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.arrived.set()
        if self.hold is not None:
            hold, self.hold = self.hold, None
            await hold.wait()
        status = self.failures.pop(0) if self.failures else 200
        call = Call(request.path, CIMultiDict(request.headers), body, status)
        self.calls.append(call)
        if status == 200:
            self._delivered[request.path].put_nowait(call)
        return web.Response(status=status, text="OK" if status == 200 else "not now")

    async def delivered(self, path: str = "/hook", timeout: float = 60) -> Call:
        """The next call to ``path`` answered 200 (waited for, up to ``timeout`` s)."""
        async with asyncio.timeout(timeout):
            return await self._delivered[path].get()

    def attempts(self, path: str = "/hook") -> list[Call]:
        return [c for c in self.calls if c.path == path]
