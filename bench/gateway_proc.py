"""A gateway process for the gateway benchmark (or a bare aiohttp app, its baseline).

``python -m bench.gateway_proc --nats URL --port P --key-path K`` runs ``asman.gateway.serve``
on 127.0.0.1 with the per-client rate limit and stream cap lifted (one load generator is
one client); ``--bare`` runs a minimal aiohttp app with the same two shapes of route (POST
JSON echo, GET JSON) instead. Prints ``{"ready": true}`` once listening, then the process's
resident memory on SIGTERM (the parent stops it by PID).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path

from aiohttp import web

from asman.gateway import GatewayConfig, GatewayLimits, serve
from asman.log.connection import LogConfig

NO_LIMIT = 1_000_000_000


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


async def _bare(port: int, stop: asyncio.Event) -> None:
    async def post(request: web.Request) -> web.Response:
        return web.json_response(await request.json(), status=201)

    async def get(request: web.Request) -> web.Response:
        return web.json_response({"job": request.match_info["job"], "state": "queued"})

    app = web.Application()
    app.router.add_post("/api/v1/queues/{queue}/jobs", post)
    app.router.add_get("/api/v1/queues/{queue}/jobs/{job}", get)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(json.dumps({"ready": True}), flush=True)
    await stop.wait()
    await runner.cleanup()


async def main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    if args.bare:
        await _bare(args.port, stop)
    else:
        config = GatewayConfig(
            log=LogConfig(servers=(args.nats,)),
            key_path=Path(args.key_path),
            host="127.0.0.1",
            port=args.port,
            limits=GatewayLimits(
                rate_per_s=float(NO_LIMIT),
                rate_burst=NO_LIMIT,
                max_streams_per_client=100_000,
            ),
        )
        server = asyncio.create_task(serve(config, stop))
        print(json.dumps({"ready": True}), flush=True)
        await server
    print(json.dumps({"peak_rss_kb": _rss_kb()}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--nats", default="")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key-path", default="")
    parser.add_argument("--bare", action="store_true")
    asyncio.run(main(parser.parse_args()))
