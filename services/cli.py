"""castmesh: the composition root, the one module that imports every service.

  castmesh up                     every service in one process, no Consul, with a demo stream
  castmesh serve relay|ingest|playback
  castmesh bench fanout ...
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any

# The demo publisher and the bench spawn ffmpeg; gRPC's fork handlers are for children that use gRPC.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc

from castmesh.mesh import config, grpcutil, logs, runtime
from castmesh.mesh.config import ConfigError, Option
from castmesh.proto.v1.relay_pb2_grpc import RelayStub
from services.demo import run_demo
from services.ingest.rtmp_server import Ingest
from services.playback.server import Playback
from services.relay import service as relay_service

log = logging.getLogger("castmesh")

HOST = Option("--host", "0.0.0.0", "address the public ports listen on")
RTMP_PORT = Option("--rtmp-port", 1935, "RTMP port for publishers", config.port)
HTTP_PORT = Option("--http-port", 8080, "HTTP port for HTTP-FLV viewers and /metrics", config.port)
GRPC_PORT = Option("--grpc-port", 50051, "gRPC port of the relay", config.port)
RELAY = Option("--relay", "127.0.0.1:50051", "address (host:port) of the relay to publish to / play from")
BATCH_MS = Option("--batch-ms", 10, "how long ingest gathers frames into one batch (ms)", config.positive)
MERGE_MS = Option("--merge-ms", 30, "how long playback gathers frames into one socket write (ms)",
                  config.positive)
MAX_LAG_MS = Option("--max-lag-ms", 3000, "how far a viewer or subscriber may fall behind before it skips "
                    "to a keyframe (ms)", config.positive)
METRICS_PORT = Option("--metrics-port", 0, "port for /metrics (0: off; playback serves it on its HTTP port)",
                      config.port)
LOG_LEVEL = Option("--log-level", "info", "debug, info, warning or error")
NO_DEMO = Option("--no-demo", False, "do not start the demo publisher", config.flag)
UP_GRPC_PORT = Option("--grpc-port", 0, "gRPC port of the in-process relay on 127.0.0.1 (0: any free port)",
                      config.port)

COMMON = [LOG_LEVEL]
UP = [HOST, RTMP_PORT, HTTP_PORT, UP_GRPC_PORT, BATCH_MS, MERGE_MS, MAX_LAG_MS, NO_DEMO, *COMMON]
SERVE = {
    "relay": [HOST, GRPC_PORT, MAX_LAG_MS, METRICS_PORT, *COMMON],
    "ingest": [HOST, RTMP_PORT, RELAY, BATCH_MS, METRICS_PORT, *COMMON],
    "playback": [HOST, HTTP_PORT, RELAY, MERGE_MS, MAX_LAG_MS, *COMMON],
}
RELAY_WAIT = 5.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="castmesh", description="castmesh: a live-streaming cluster (RTMP in, HTTP-FLV out) over gRPC.",
        epilog="Every option can also be set with the CASTMESH_* environment variable shown beside it.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = commands.add_parser(
        "up", help="run every service in one process (no Consul), with a demo stream",
        description="Run ingest, relay and playback in one process, talking gRPC over loopback. Publish to "
                    "rtmp://HOST:RTMP_PORT/{app}/{stream}; play http://HOST:HTTP_PORT/{app}/{stream}.flv.")
    config.add_options(up, UP)
    serve = commands.add_parser("serve", help="run one service alone",
                                description="Run one service alone; ingest and playback need --relay.")
    services = serve.add_subparsers(dest="service", required=True, metavar="SERVICE")
    for name, options in SERVE.items():
        config.add_options(services.add_parser(name, help=f"run the {name} service"), options)
    from castmesh.bench import fanout

    fanout.add_parser(commands.add_parser("bench", help="benchmarks on loopback").add_subparsers(
        dest="bench", required=True, metavar="BENCH"))
    return parser


async def _relay_stub(target: str) -> tuple[grpc.aio.Channel, RelayStub]:
    chan = grpcutil.channel(target)
    try:
        await grpcutil.wait_ready(chan, f"the relay at {target}", RELAY_WAIT)
    except ConnectionError:
        await chan.close()
        raise
    return chan, RelayStub(chan)


def _banner(cfg: dict[str, Any], relay_port: int) -> str:
    host = "127.0.0.1" if cfg["host"] in ("0.0.0.0", "::", "") else cfg["host"]
    rtmp, http = cfg["rtmp_port"], cfg["http_port"]
    lines = [
        "castmesh is up: ingest, relay and playback in one process (no Consul)",
        f"  publish  rtmp://{host}:{rtmp}/live/STREAM   (OBS: server rtmp://{host}:{rtmp}/live, key STREAM)",
        f"  play     http://{host}:{http}/live/STREAM.flv",
    ]
    if not cfg["no_demo"]:
        lines.append(f"  demo     ffplay http://{host}:{http}/live/demo.flv")
    lines += [f"  metrics  http://{host}:{http}/metrics", f"  relay    127.0.0.1:{relay_port} (gRPC)",
              "Ctrl-C stops."]
    return "\n".join(lines)


async def up(cfg: dict[str, Any]) -> int:
    stop = runtime.stop_event()
    max_lag = cfg["max_lag_ms"] / 1000
    relay_server, relay_port, _ = await relay_service.start("127.0.0.1", cfg["grpc_port"], max_lag)
    channels: list[grpc.aio.Channel] = []
    servers: list[asyncio.Server] = []
    try:
        ingest_chan, ingest_stub = await _relay_stub(f"127.0.0.1:{relay_port}")
        playback_chan, playback_stub = await _relay_stub(f"127.0.0.1:{relay_port}")
        channels += [ingest_chan, playback_chan]
        servers.append(await Ingest(ingest_stub, cfg["batch_ms"]).listen(cfg["host"], cfg["rtmp_port"]))
        playback = Playback(playback_stub, cfg["merge_ms"], max_lag)
        servers.append(await playback.listen(cfg["host"], cfg["http_port"]))
        print(_banner(cfg, relay_port), flush=True)
        demo = None
        if not cfg["no_demo"]:
            url = f"rtmp://127.0.0.1:{cfg['rtmp_port']}/live/demo"
            demo = asyncio.get_running_loop().create_task(run_demo(url, stop))
        await stop.wait()
        if demo is not None:
            await demo
    finally:
        await _shutdown(servers, channels, relay_server)
    return 0


async def _shutdown(servers: list[asyncio.Server], channels: list[grpc.aio.Channel],
                    relay_server: grpc.aio.Server | None) -> None:
    for srv in servers:
        srv.close()
    for chan in channels:
        await chan.close()
    if relay_server is not None:
        await relay_server.stop(grace=1)


async def serve(service: str, cfg: dict[str, Any]) -> int:
    stop = runtime.stop_event()
    if cfg.get("metrics_port"):
        from prometheus_client import start_http_server

        start_http_server(cfg["metrics_port"], addr=cfg["host"])
    if service == "relay":
        server, port, _ = await relay_service.start(cfg["host"], cfg["grpc_port"], cfg["max_lag_ms"] / 1000)
        print(f"castmesh relay listening on {cfg['host']}:{port} (gRPC)", flush=True)
        await stop.wait()
        await server.stop(grace=1)
        return 0
    chan, stub = await _relay_stub(cfg["relay"])
    servers: list[asyncio.Server] = []
    try:
        if service == "ingest":
            servers.append(await Ingest(stub, cfg["batch_ms"]).listen(cfg["host"], cfg["rtmp_port"]))
            print(f"castmesh ingest listening on {cfg['host']}:{cfg['rtmp_port']} (RTMP), relay {cfg['relay']}",
                  flush=True)
        else:
            playback = Playback(stub, cfg["merge_ms"], cfg["max_lag_ms"] / 1000)
            servers.append(await playback.listen(cfg["host"], cfg["http_port"]))
            print(f"castmesh playback listening on {cfg['host']}:{cfg['http_port']} (HTTP-FLV), "
                  f"relay {cfg['relay']}", flush=True)
        await stop.wait()
    finally:
        await _shutdown(servers, [chan], None)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "bench":
            from castmesh.bench import fanout

            return fanout.run(args)
        options = UP if args.command == "up" else SERVE[args.service]
        cfg = config.resolve(args, options)
        logs.setup(cfg["log_level"])
        if args.command == "up":
            return runtime.run(up(cfg))
        return runtime.run(serve(args.service, cfg))
    except (OSError, ConnectionError, ConfigError) as exc:
        print(f"castmesh: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
