"""A plain nats-py connection that records the server's permission violations, and the one
check both confined setups make with it (tests/federation/test_accounts.py, test_public.py):
every request it must not make goes unanswered, every subscription it must not hold is
refused."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NATS


class Refusals:
    """The violations the server reports on one connection; ``until`` waits on them."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._reported = asyncio.Event()

    async def _on_error(self, exc: Exception) -> None:
        self.seen.append(str(exc))
        self._reported.set()

    async def connect(self, url: str, **options: Any) -> NATS:
        return await nats.connect(url, error_cb=self._on_error, max_reconnect_attempts=0, **options)

    async def until(self, done: Any, timeout: float = 10) -> None:
        """Until ``done()`` holds, re-checked on each reported violation."""
        async with asyncio.timeout(timeout):
            while not done():
                self._reported.clear()
                await self._reported.wait()

    async def expect_refused(
        self, nc: NATS, requests: Mapping[str, bytes], subscriptions: Iterable[str]
    ) -> None:
        """Every request gets no answer (a denied publish is dropped) and the server reports
        each request and each subscription as a permissions violation."""
        answers = await asyncio.gather(
            *(nc.request(s, p, timeout=1.0) for s, p in requests.items()),
            return_exceptions=True,
        )
        assert all(isinstance(a, nats.errors.TimeoutError) for a in answers), answers
        subs = tuple(subscriptions)
        for subject in subs:
            await nc.subscribe(subject)
        await nc.flush()

        def unreported() -> list[str]:
            # nats-py lower-cases the server's -ERR text
            return [
                s for s in [*requests, *subs] if not any(f'"{s.lower()}"' in v for v in self.seen)
            ]

        try:
            await self.until(lambda: not unreported())
        except TimeoutError:
            raise AssertionError(f"not refused: {unreported()}; {self.seen}") from None
