"""A small Server-Sent Events reader for aiohttp responses (tests only)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp


async def read_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """Yield ``{"event", "id", "data"}`` per event; ``data`` parsed as JSON when it is.
    ``id`` is the event's own id field (``None`` when it has none)."""
    event, data, event_id = "message", [], None
    async for raw in _lines(resp):
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    parsed: Any = json.loads(text)
                except ValueError:
                    parsed = text
                yield {"event": event, "id": event_id, "data": parsed}
            event, data, event_id = "message", [], None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value


async def _lines(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The body's lines, however long (a log event carries up to 512 KiB of text, past
    aiohttp's own line limit)."""
    pending = b""
    async for chunk in resp.content.iter_any():
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line
    if pending:
        yield pending
