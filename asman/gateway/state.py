"""The gateway's application state, typed with ``web.AppKey``.

``CONFIG``, ``LIMITER`` and ``METRICS`` are set by ``create_app``; ``LOG``, ``BLOBS``,
``FOLLOWERS`` (the job streams' shared readers), ``REPLACER`` (releases jobs replaced in
their namespace, after their grace), ``CALLBACKS`` and ``TMP_DIR`` by the resources context
(``cleanup_ctx``) once the log is connected; ``CLOSING`` is set when the server shuts down,
so event streams end at once instead of holding the shutdown for their whole timeout.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from asman.gateway.config import GatewayConfig
from asman.gateway.follow import Followers
from asman.gateway.limits import RateLimiter
from asman.gateway.metrics import GatewayMetrics
from asman.log.blobs import BlobStore
from asman.log.connection import Log
from asman.log.namespaces import Replacer
from asman.peer.callbacks import CallbackSender

__all__ = [
    "BLOBS",
    "CALLBACKS",
    "CLOSING",
    "CONFIG",
    "FOLLOWERS",
    "LIMITER",
    "LOG",
    "METRICS",
    "REPLACER",
    "TMP_DIR",
]

CONFIG = web.AppKey("config", GatewayConfig)
LOG = web.AppKey("log", Log)
BLOBS = web.AppKey("blobs", BlobStore)
FOLLOWERS = web.AppKey("followers", Followers)
LIMITER = web.AppKey("limiter", RateLimiter)
METRICS = web.AppKey("metrics", GatewayMetrics)
TMP_DIR = web.AppKey("tmp_dir", Path)
REPLACER = web.AppKey("replacer", Replacer)
CLOSING = web.AppKey("closing", asyncio.Event)
#: sends the callbacks of what the gateway appends (a submission's ``queued``, the
#: ``finished`` of a queued job it cancels or releases), in the background
CALLBACKS = web.AppKey("callbacks", CallbackSender)
