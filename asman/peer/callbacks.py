"""Webhooks: a job's ``control.callbacks`` POSTed, signed, retried, never in anyone's way.

Two callbacks (``asman.log.control``), each a JSON POST:

* ``queued`` — compute-queues' body ``{jobId, queue, namespace, config}`` (``config`` is the
  callback's ``payload``), sent by the peer that put the job on the queue (a gateway, or the
  CLI's ``submit``) right after its append, when the job was created or re-run (not for a
  resubmission that found it queued, running or cached, as compute-queues).
* ``finished`` — declared by compute-queues and never sent there: the same fields plus the
  job's ``state``, ``finishedReason`` (compute-queues' names), ``reason`` and ``exitCode``
  (Asman's), ``message`` and ``worker``. Sent by the peer whose event finished the job: the
  worker that ran it, or the peer whose cancel ended a job that never ran.

Both carry ``"event"`` in the body and are signed with the sender's Asman key, in the
headers of the Standard Webhooks convention plus the key itself::

    webhook-id: finished-<job id>-<seq>     (the same on every retry of one delivery)
    webhook-timestamp: <unix seconds>       (of this attempt)
    webhook-signature: v1a,<base64 Ed25519 signature of "<id>.<timestamp>.<body>">
    asman-key: <the sender's peer id: 64 hex, the raw Ed25519 public key>

so a receiver checks the signature with the key, and the key against the job's log (the
``finished`` sender is the job's ``result.worker``; the ``queued`` one its submitter, or the
gateway it trusts). docs/guide.md has a receiver's code.

Delivery runs in the background (the sender's own task group): a POST is retried with
exponential backoff until a 2xx, for at most ``CallbackSettings.window_s`` (10 minutes);
a URL the sender's :class:`~asman.peer.netguard.UrlPolicy` refuses is not retried. A failed
callback never fails a job or a submission; it is logged once, with the reason.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
from yarl import URL

from asman.errors import InvalidInput, UrlRefused
from asman.log.control import Callback, callback_of, namespace_of
from asman.log.events import JobState
from asman.log.keys import PeerKey, peer_id_to_bytes, verify
from asman.peer.netguard import UrlPolicy, guarded_post, guarded_session

__all__ = [
    "ID_HEADER",
    "KEY_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "CallbackSender",
    "CallbackSettings",
    "finished_body",
    "queued_body",
    "signed_headers",
    "verify_callback",
]

logger = logging.getLogger(__name__)

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
KEY_HEADER = "asman-key"
#: how far a receiver lets a callback's timestamp be from its own clock
TOLERANCE_S = 300


@dataclass(frozen=True, slots=True)
class CallbackSettings:
    """How callbacks are delivered: retried until ``window_s`` after the first attempt,
    waiting ``first_delay_s`` doubled after each failure up to ``max_delay_s``; each POST
    may take ``timeout_s``. When its owner stops, the sender gives deliveries still
    underway ``grace_s``, then abandons them (and says so). At most ``max_pending``
    deliveries are underway at once; a callback beyond them is not sent (and said so), so a
    flood of submissions naming dead receivers cannot grow a gateway without bound."""

    window_s: float = 600.0
    first_delay_s: float = 1.0
    max_delay_s: float = 60.0
    timeout_s: float = 10.0
    grace_s: float = 10.0
    max_pending: int = 10_000


def _json(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def signed_headers(
    key: PeerKey, delivery_id: str, body: bytes, now_s: int | None = None
) -> dict[str, str]:
    """The headers that sign ``body``: Standard Webhooks' id, timestamp and an asymmetric
    (``v1a``, Ed25519) signature of ``<id>.<timestamp>.<body>``, and the signing key."""
    from asman import __version__  # (asman's __init__ imports the client, which imports us)

    ts = str(int(time.time()) if now_s is None else now_s)
    signature = key.sign(f"{delivery_id}.{ts}.".encode() + body)
    return {
        ID_HEADER: delivery_id,
        TIMESTAMP_HEADER: ts,
        SIGNATURE_HEADER: "v1a," + base64.b64encode(signature).decode(),
        KEY_HEADER: key.peer_id,
        "Content-Type": "application/json",
        "User-Agent": f"asman/{__version__}",
    }


def verify_callback(
    headers: Mapping[str, str], body: bytes, *, tolerance_s: int = TOLERANCE_S
) -> str:
    """The sender's peer id, when ``body`` is signed by it and recent; ``InvalidInput``
    saying what is wrong otherwise. ``headers`` must match names case-insensitively (an
    aiohttp request's do). Whether that peer may speak for the job is the caller's check."""
    try:
        key = headers[KEY_HEADER]
        delivery_id = headers[ID_HEADER]
        ts = headers[TIMESTAMP_HEADER]
        signatures = headers[SIGNATURE_HEADER]
    except KeyError as exc:
        raise InvalidInput(f"not an Asman callback: no {exc.args[0]} header") from None
    if not ts.isdigit() or abs(time.time() - int(ts)) > tolerance_s:
        raise InvalidInput(f"callback timestamp {ts[:20]!r} is not within {tolerance_s}s of now")
    raw_key = peer_id_to_bytes(key)
    signed = f"{delivery_id}.{ts}.".encode() + body
    for entry in signatures.split():
        version, _, value = entry.partition(",")
        if version != "v1a":
            continue
        with contextlib.suppress(ValueError):
            if verify(raw_key, base64.b64decode(value, validate=True), signed):
                return key
    raise InvalidInput(f"the callback's signature does not verify for key {key[:12]}…")


def queued_body(queue: str, job_id: str, control: Mapping[str, Any]) -> dict[str, Any]:
    """compute-queues' queued webhook body, with the event's name."""
    callback = callback_of(control, "queued")
    payload = callback.payload if callback is not None else None
    return {
        "event": "queued",
        "jobId": job_id,
        "queue": queue,
        "namespace": namespace_of(control),
        "config": payload if payload is not None else {},
    }


def finished_body(state: JobState) -> dict[str, Any]:
    """The finished webhook body: the queued one's fields and the job's result."""
    result = state.result
    assert result is not None, "only a finished job has a finished callback"
    callback = callback_of(state.control, "finished")
    payload = callback.payload if callback is not None else None
    cq_state, cq_reason = state.cq_state
    return {
        "event": "finished",
        "jobId": state.job_id,
        "queue": state.queue,
        "namespace": namespace_of(state.control),
        "config": payload if payload is not None else {},
        "state": cq_state,
        "finishedReason": cq_reason,
        "reason": result.reason,
        "exitCode": result.exit_code,
        "message": result.message,
        "worker": result.worker,
        "attempt": result.attempt,
        "durationMs": result.duration_ms,
    }


class CallbackSender:
    """Delivers callbacks in the background, signed with ``key``, to the URLs ``policy``
    allows. ``async with CallbackSender(...) as sender: sender.queued(...)``; leaving the
    block gives deliveries underway ``settings.grace_s`` to end."""

    def __init__(
        self,
        key: PeerKey,
        policy: UrlPolicy,
        settings: CallbackSettings | None = None,
    ) -> None:
        self.key = key
        self.policy = policy
        self.settings = settings or CallbackSettings()
        self._stack: contextlib.AsyncExitStack | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self.delivered = 0
        self.failed = 0

    async def __aenter__(self) -> CallbackSender:
        if self._stack is not None:
            raise RuntimeError("a CallbackSender is entered once")
        stack = contextlib.AsyncExitStack()
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_s)
        self._session = await stack.enter_async_context(guarded_session(self.policy, timeout))
        self._tg = await stack.enter_async_context(asyncio.TaskGroup())
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._stack is not None
        try:
            if self._pending:
                _, late = await asyncio.wait(set(self._pending), timeout=self.settings.grace_s)
                for task in late:
                    task.cancel()
        finally:
            self._tg = None
            # an error of the block is its owner's, raised as it is: the task group holds only
            # deliveries, done or cancelled by now, and would wrap it in an ExceptionGroup
            # (a cancellation still goes through it)
            mine = exc_type is not None and issubclass(exc_type, Exception)
            await self._stack.__aexit__(*((None, None, None) if mine else (exc_type, exc, tb)))

    @property
    def pending(self) -> int:
        """Deliveries underway."""
        return len(self._pending)

    def queued(self, queue: str, job_id: str, control: Mapping[str, Any], seq: int) -> bool:
        """Send the ``queued`` callback of a job just put on the queue (by the event at
        ``seq``), if its control has one. Returns at once."""
        callback = callback_of(control, "queued")
        if callback is None:
            return False
        body = queued_body(queue, job_id, control)
        return self.send("queued", callback, body, f"queued-{job_id}-{seq}")

    def finished(self, state: JobState) -> bool:
        """Send the ``finished`` callback of a job this peer just finished, if its control
        has one. Returns at once."""
        callback = callback_of(state.control, "finished")
        if callback is None or state.result is None:
            return False
        body = finished_body(state)
        return self.send("finished", callback, body, f"finished-{state.job_id}-{state.last_seq}")

    def send(self, event: str, callback: Callback, body: Mapping[str, Any], delivery: str) -> bool:
        """Deliver ``body`` to the callback's URL in the background; False when it cannot
        be (the sender is closed, or has ``max_pending`` deliveries underway)."""
        job = str(body.get("jobId", ""))[:12]
        if self._tg is None:
            logger.warning("callback %s job=%s not sent: the sender is closed", event, job)
            return False
        if len(self._pending) >= self.settings.max_pending:
            self.failed += 1
            logger.warning(
                "callback %s job=%s not sent: %d callbacks are being delivered already",
                event,
                job,
                len(self._pending),
            )
            return False
        task = self._tg.create_task(self._deliver(event, callback.url, _json(body), delivery))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return True

    async def _deliver(self, event: str, url: str, body: bytes, delivery: str) -> None:
        """POST until a 2xx, within the window; one log line for the outcome."""
        settings = self.settings
        assert self._session is not None
        job = delivery.split("-")[1][:12]
        started = time.monotonic()
        delay = settings.first_delay_s
        attempts = 0
        why = ""
        try:
            while True:
                attempts += 1
                try:
                    status = await guarded_post(
                        self._session,
                        url,
                        self.policy,
                        data=body,
                        headers=signed_headers(self.key, delivery, body),
                        target=f"callback {event} of job {job}",
                    )
                    if 200 <= status < 300:
                        self.delivered += 1
                        logger.info(
                            "callback %s job=%s delivered status=%d attempts=%d",
                            event,
                            job,
                            status,
                            attempts,
                        )
                        return
                    why = f"HTTP {status}"
                except UrlRefused as exc:
                    self.failed += 1
                    logger.warning("callback %s job=%s not sent: %s", event, job, exc)
                    return
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    why = f"{type(exc).__name__}: {exc}"[:300] or type(exc).__name__
                elapsed = time.monotonic() - started
                wait = min(delay, settings.max_delay_s) * random.uniform(0.8, 1.2)
                if elapsed + wait > settings.window_s:
                    break
                logger.debug("callback %s job=%s attempt %d: %s", event, job, attempts, why)
                await asyncio.sleep(wait)
                delay *= 2
        except asyncio.CancelledError:
            self.failed += 1
            logger.warning(
                "callback %s job=%s to %s abandoned after %d attempt(s) (the sender stopped)%s",
                event,
                job,
                _shown(url),
                attempts,
                f"; last: {why}" if why else "",
            )
            raise
        self.failed += 1
        logger.warning(
            "callback %s job=%s to %s not delivered in %d attempt(s) over %.0fs: last %s",
            event,
            job,
            _shown(url),
            attempts,
            time.monotonic() - started,
            why,
        )


def _shown(url: str) -> str:
    """A URL for a log line, without credentials or query (they may hold a secret)."""
    try:
        return str(URL(url).with_user(None).with_query(None).with_fragment(None))
    except ValueError:
        return "(a URL that does not parse)"
