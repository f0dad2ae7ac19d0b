"""Limits at the edge: per-client token buckets, stream counts, and bounded JSON bodies."""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from asman.errors import InvalidInput

__all__ = [
    "MAX_JSON_DEPTH",
    "RateLimited",
    "RateLimiter",
    "TooLarge",
    "client_key",
    "parse_json",
    "read_json",
]

MAX_JSON_DEPTH = 32


class RateLimited(Exception):
    """A client spent its tokens (or opened too many streams); ``retry_after_s`` says when
    to try again. The error middleware answers 429."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class TooLarge(InvalidInput):
    """A body over its limit (answered 413)."""


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float
    streams: int = 0


class RateLimiter:
    """A token bucket per client: ``burst`` tokens, refilled at ``rate`` per second.

    The table is bounded: when it holds ``max_clients`` entries the least recently seen one
    is dropped (a dropped client starts again with a full bucket, which only errs towards
    letting requests through). Not thread-safe; it lives on the event loop.
    """

    def __init__(
        self, rate: float, burst: int, *, max_streams: int, max_clients: int = 10_000
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.max_streams = max_streams
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def _bucket(self, client: str, now: float) -> _Bucket:
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
            self._buckets[client] = bucket
            if len(self._buckets) > self.max_clients:
                for name, old in self._buckets.items():
                    if not old.streams and name != client:  # keep clients with open streams
                        del self._buckets[name]
                        break
        else:
            self._buckets.move_to_end(client)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
        return bucket

    def take(self, client: str, cost: float = 1.0, now: float | None = None) -> None:
        """Spend ``cost`` tokens or raise :class:`RateLimited`."""
        now = time.monotonic() if now is None else now
        bucket = self._bucket(client, now)
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return
        wait = (cost - bucket.tokens) / self.rate
        raise RateLimited(
            f"too many requests from {client}: the limit is {self.rate:g} per second with "
            f"bursts of {self.burst}; retry in {math.ceil(wait)} s",
            wait,
        )

    def open_stream(self, client: str) -> None:
        """Count an event stream the client opens; raise when it holds too many."""
        bucket = self._bucket(client, time.monotonic())
        if bucket.streams >= self.max_streams:
            raise RateLimited(
                f"{client} has {bucket.streams} event streams open, the limit is "
                f"{self.max_streams}: close one first",
                5.0,
            )
        bucket.streams += 1

    def close_stream(self, client: str) -> None:
        bucket = self._buckets.get(client)
        if bucket is not None and bucket.streams > 0:
            bucket.streams -= 1

    def __len__(self) -> int:
        return len(self._buckets)


def client_key(request: web.Request, *, trust_forwarded: bool) -> str:
    """Who the rate limit counts: the peer address, or the first ``X-Forwarded-For`` entry
    when the gateway runs behind a proxy it trusts."""
    if trust_forwarded:
        forwarded = request.headers.get("X-Forwarded-For", "")
        first = forwarded.split(",", 1)[0].strip()
        if first:
            return first[:64]
    return request.remote or "unknown"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _depth_ok(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in item)
    return True


async def read_json(request: web.Request, limit: int, *, what: str = "the body") -> Any:
    """The request body parsed as JSON, at most ``limit`` bytes and ``MAX_JSON_DEPTH`` deep.

    ``TooLarge`` (413) over the limit; ``InvalidInput`` (400) for anything that is not JSON.
    """
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"{what} is {request.content_length} bytes, over the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"{what} is over the limit of {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise InvalidInput(f"{what} is empty: send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{what} is not UTF-8 text: send JSON") from None
    return parse_json(text, what=what)


def parse_json(text: str, *, what: str) -> Any:
    """``text`` parsed as JSON, at most ``MAX_JSON_DEPTH`` deep, no ``NaN`` or ``Infinity``;
    ``InvalidInput`` naming ``what`` otherwise."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidInput(f"{what} is nested too deeply") from None
    except ValueError as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from None
    if not _depth_ok(value, MAX_JSON_DEPTH):
        raise InvalidInput(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")
    return value
