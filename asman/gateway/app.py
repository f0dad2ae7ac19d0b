"""The gateway application: ``create_app(config)`` builds it, ``serve(config, stop)`` runs it.

A gateway is stateless: it holds one connection to the log (signed with its own key) and one
blob store, both opened by the resources context (``cleanup_ctx``) and closed with the app. Run
as many as you like; any of them answers any request the same.

``serve`` shuts down in this order once ``stop`` is set:

1. stop accepting connections (the listening socket is closed);
2. ``CLOSING`` is set, so event streams end at once;
3. requests in flight get ``shutdown_timeout_s`` to finish, then are cancelled;
4. the resources context does the namespace replacements still in their grace at once,
   gives callbacks still underway (those releases' among them) their grace, closes the
   blob store's temp dir and drains the log connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from asman.errors import ConfigError
from asman.gateway import api, compat, schemas, signing, tes
from asman.gateway.config import GatewayConfig
from asman.gateway.follow import Followers
from asman.gateway.limits import RateLimiter
from asman.gateway.metrics import GatewayMetrics
from asman.gateway.middleware import (
    add_response_headers,
    error_middleware,
    rate_limit_middleware,
)
from asman.gateway.openapi import openapi_document
from asman.gateway.page import page, static_file
from asman.gateway.state import (
    BLOBS,
    CALLBACKS,
    CLOSING,
    CONFIG,
    FOLLOWERS,
    LIMITER,
    LOG,
    METRICS,
    REPLACER,
    TMP_DIR,
)
from asman.log.blobs import BlobStore
from asman.log.connection import Log
from asman.log.keys import PeerKey
from asman.log.namespaces import Replacer
from asman.log.objstore import ObjectStoreBlobs
from asman.peer.callbacks import CallbackSender

__all__ = ["GatewayConfig", "create_app", "serve"]

logger = logging.getLogger(__name__)


async def _open_blobs(config: GatewayConfig, log: Log) -> BlobStore:
    if config.blobs_url is None:
        store = ObjectStoreBlobs(log.js)
        await store.ensure()
        return store
    from asman.peer.s3 import S3Blobs  # only a gateway configured for S3 needs minio

    s3 = S3Blobs.from_url(config.blobs_url, config.s3_access_key or "", config.s3_secret_key or "")
    await s3.ensure()
    return s3


async def _resources(app: web.Application) -> AsyncIterator[None]:
    """Connect the log with the gateway's key, open the blob store and a scratch dir."""
    config = app[CONFIG]
    key = await asyncio.to_thread(PeerKey.load_or_create, config.key_path)
    async with (
        Log(config.log, key) as log,
        CallbackSender(key, config.url_policy(), config.callbacks) as callbacks,
    ):
        app[LOG] = log
        app[CALLBACKS] = callbacks
        app[BLOBS] = await _open_blobs(config, log)
        tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="asman-gateway-"))
        app[TMP_DIR] = tmp
        app[FOLLOWERS] = followers = Followers(log, poll_s=config.poll_s)
        # a release that ends a job still queued is the gateway's event: it sends ``finished``
        app[REPLACER] = replacer = Replacer(log, on_finished=callbacks.finished)
        app[METRICS].followers.set_function(lambda: len(followers))
        logger.info("gateway %s connected as peer %s", config.name, log.peer_id)
        try:
            yield
        finally:
            await replacer.close()
            await followers.close()
            await asyncio.to_thread(shutil.rmtree, tmp, True)


async def _on_shutdown(app: web.Application) -> None:
    app[CLOSING].set()


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(request.app[CONFIG]))


def create_app(config: GatewayConfig) -> web.Application:
    """The gateway as an aiohttp application (not yet connected: the log is opened on
    startup by its resources context)."""
    app = web.Application(
        middlewares=[error_middleware, rate_limit_middleware],
        client_max_size=config.limits.max_body_bytes,
        handler_args={"max_field_size": 16 * 1024, "max_line_size": 16 * 1024},
    )
    limits = config.limits
    app[CONFIG] = config
    app[LIMITER] = RateLimiter(
        limits.rate_per_s,
        limits.rate_burst,
        max_streams=limits.max_streams_per_client,
        max_clients=limits.max_tracked_clients,
    )
    app[METRICS] = GatewayMetrics()
    app[CLOSING] = asyncio.Event()
    app.cleanup_ctx.append(_resources)
    app.on_shutdown.append(_on_shutdown)
    app.on_response_prepare.append(add_response_headers)

    app.router.add_get("/", page)
    app.router.add_get("/static/{name}", static_file)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get(schemas.SCHEMA_ROUTE, schemas.definition_schema)
    api.add_routes(app)
    signing.add_routes(app)
    compat.add_routes(app)
    tes.add_routes(app)
    return app


async def serve(
    config: GatewayConfig, stop: asyncio.Event, ready: Callable[[], None] | None = None
) -> None:
    """Run the gateway on ``config.host:config.port`` until ``stop`` is set, then shut down
    gracefully (see the module docstring); ``ready()`` is called once it listens. Raises
    ``LogUnavailable`` when the log cannot be reached at startup, ``ConfigError`` when the
    address cannot be listened on."""
    app = create_app(config)
    runner = web.AppRunner(app, shutdown_timeout=config.shutdown_timeout_s, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(
                f"the gateway cannot listen on {config.host}:{config.port}: "
                f"{exc.strerror or exc} (is another gateway running there? pick another port)"
            ) from exc
        for address in runner.addresses:
            logger.info("gateway listening on %s", address)
        if ready is not None:
            ready()
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            app[CLOSING].set()
        await runner.cleanup()
