"""The gateway: JSON, Server-Sent Events and the browser page in front of the log.

``create_app(config)`` builds the aiohttp application; ``serve(config, stop)`` runs it until
``stop`` is set. See docs/reference/http-api.md.
"""

from asman.gateway.app import create_app, serve
from asman.gateway.config import GatewayConfig, GatewayLimits

__all__ = ["GatewayConfig", "GatewayLimits", "create_app", "serve"]
