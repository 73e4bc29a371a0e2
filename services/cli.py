"""castmesh: the composition root, the one module that imports every service.

  castmesh up                     every service in one process, no Consul, with a demo stream
  castmesh serve dispatch|relay|ingest|playback|gateway|worker
  castmesh bench fanout ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

# The demo publisher and the bench spawn ffmpeg; gRPC's fork handlers are for children that use gRPC.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc
import imageio_ffmpeg
from aiohttp import web

from castmesh.mesh import config, grpcutil, logs, runtime, tracing
from castmesh.mesh.access import AccessLists, parse_networks, parse_per_app
from castmesh.mesh.admin import add_admin
from castmesh.mesh.auth import Signer
from castmesh.mesh.caps import ConnectionCaps
from castmesh.mesh.catalog import Catalog
from castmesh.mesh.config import ConfigError, Option
from castmesh.mesh.consul import ConsulNodes, ConsulRegistry
from castmesh.mesh.consul import client_from_env as consul_client
from castmesh.mesh.hooks import Hooks
from castmesh.mesh.jobs import ABR as ABR_KIND
from castmesh.mesh.jobs import FORWARD, PULL, RECORD, JobError, Rule, parse_rules
from castmesh.mesh.registry import DispatchRegistry, Registry
from castmesh.mesh.subscription import Locate, dispatch_upstream, fixed_upstream
from castmesh.mesh.tls import serve_tls, tls_context
from castmesh.proto.v1.admin_pb2 import KickRequest
from castmesh.proto.v1.dispatch_pb2 import (
    NODE_ROLE_DISPATCH,
    NODE_ROLE_EDGE,
    NODE_ROLE_GATEWAY,
    NODE_ROLE_INGEST,
    NODE_ROLE_ORIGIN,
    NODE_ROLE_PLAYBACK,
    NODE_ROLE_WORKER,
    ListNodesRequest,
    Node,
    NodeLoad,
)
from castmesh.proto.v1.dispatch_pb2_grpc import DispatchStub
from castmesh.proto.v1.media_pb2 import StreamKey
from castmesh.srt.server import SrtServer, SrtSide, parse_passphrases
from castmesh.webrtc.settings import IceSettings
from services.demo import run_demo
from services.dispatch import service as dispatch_service
from services.dispatch.consul_directory import ConsulDirectory
from services.dispatch.directory import Directory, InMemoryDirectory
from services.dispatch.jobs import JobBoard
from services.gateway.app import Gateway
from services.ingest.lease import DispatchLease, FixedLease, Lease
from services.ingest.session import Ingest
from services.ingest.srt import SrtIngest
from services.ingest.whip import WhipIngest, whip_app
from services.playback.forward import Forwarder
from services.playback.h2 import HTTPS_ALPN, H2Session, by_alpn
from services.playback.http import HttpSession
from services.playback.recordings import RecordingRoutes
from services.playback.server import Playback, PlaybackSettings
from services.relay import service as relay_service
from services.relay.service import RelayService
from services.worker.record import Recordings, RecordSettings
from services.worker.recordings import LocalRecordings, RemoteRecordings
from services.worker.recordings import routes as recording_routes
from services.worker.service import Worker
from services.worker.thumbs import RemoteThumbnails, thumbnail_app
from services.worker.upload import Uploader, parse_s3_url

log = logging.getLogger("castmesh")

HOST = Option("--host", "0.0.0.0", "address the public ports listen on")
RTMP_PORT = Option("--rtmp-port", 1935, "RTMP port for publishers (in `up`, for players too)", config.port)
PLAY_RTMP_PORT = Option("--rtmp-port", 1936, "RTMP port for players (0: no RTMP play)", config.port)
RTMPS_PORT = Option("--rtmps-port", 1937, "RTMPS port (RTMP inside TLS) when --tls-cert is given (0: none)",
                    config.port)
SRT_PORT = Option("--srt-port", 8890, "UDP port for SRT publishers (stream id #!::r=APP/STREAM,m=publish or "
                  "publish:APP/STREAM; in `up`, players too: m=request or read:APP/STREAM); 0: none", config.port)
PLAY_SRT_PORT = Option("--srt-port", 8891, "UDP port for SRT players (stream id #!::r=APP/STREAM,m=request, "
                       "read:APP/STREAM or APP/STREAM); 0: none", config.port)
SRT_PASSPHRASE = Option("--srt-passphrase", "", "SRT encryption: one passphrase (10-79 characters) or per app "
                        "live=PASS,studio=PASS; callers without it are rejected")
SRT_LATENCY_MS = Option("--srt-latency-ms", 120, "SRT receive latency: how long lost packets may take to be "
                        "resent (ms; SRT's default 120)", config.positive)
SRT_MAX_BW = Option("--srt-max-bw", 0, "SRT: cap on the bytes per second a connection sends, retransmissions "
                    "included (0: libsrt's default)", config.non_negative)
SRT = [SRT_PORT, SRT_PASSPHRASE, SRT_LATENCY_MS, SRT_MAX_BW]
PLAY_SRT = [PLAY_SRT_PORT, SRT_PASSPHRASE, SRT_LATENCY_MS, SRT_MAX_BW]
PLAY_RTMPS_PORT = Option("--rtmps-port", 0, "RTMPS port for players, with --tls-cert (0: none)", config.port)
HTTP_PORT = Option("--http-port", 8080, "HTTP port for HTTP-FLV viewers and /metrics", config.port)
GRPC_PORT = Option("--grpc-port", 50051, "gRPC port of the relay", config.port)
DISPATCH_PORT = Option("--grpc-port", 50050, "gRPC port of dispatch", config.port)
DISPATCH = Option("--dispatch", "", "address (host:port) of dispatch; with it, placement and failover are "
                  "cluster-wide")
RELAY = Option("--relay", "127.0.0.1:50051", "without --dispatch: the one relay to publish to / play from")
ROLE = Option("--role", "origin", "origin (takes publishes) or edge (pulls from an origin or --upstream)")
UPSTREAM = Option("--upstream", "", "edge only: pull from this relay instead of asking dispatch (chains of edges)")
ZONE = Option("--zone", "", "region/zone label: playback nodes use an edge of their own zone")
ADVERTISE = Option("--advertise", "", "address (host:port) others reach this relay at (default: the advertised "
                   "host and the gRPC port)")
ADVERTISE_HOST = Option("--advertise-host", "", "host others reach this node at; 'auto': the address of this "
                        "machine's name (containers); default: 127.0.0.1 when listening on all interfaces")
CHECK_CONFIG = Option("--check-config", False, "print the resolved configuration as JSON and exit", config.flag)
BATCH_MS = Option("--batch-ms", 50, "the longest ingest holds audio and data for the next video frame to carry "
                  "them (ms); video goes at once. 0: every frame at once", config.non_negative)
MERGE_MS = Option("--merge-ms", 50, "the longest playback holds audio and data for the next video frame, and the "
                  "widest it gathers pictures when writing viewers keeps it busy (ms). 0: every frame at once",
                  config.non_negative)
HLS_SEGMENT_MS = Option("--hls-segment-ms", 2000, "HLS target segment duration (ms; cut at the next keyframe)",
                        config.positive)
HLS_WINDOW = Option("--hls-window", 6, "HLS segments listed in a playlist", config.positive)
HLS_PART_MS = Option("--hls-part-ms", 200, "low-latency HLS (?format=llhls): the longest a partial segment lasts (ms)",
                     config.positive)
HLS_IDLE_MS = Option("--hls-idle-ms", 30000, "stop a stream's HLS muxer after this long without a request (ms)",
                     config.positive)
MAX_LAG_MS = Option("--max-lag-ms", 3000, "how far a viewer or subscriber may fall behind before it skips "
                    "to a keyframe (ms)", config.positive)
GRACE_MS = Option("--grace-ms", 10000, "how long a stream waits for a publisher that vanished to come back "
                  "(ms; 0: end at once)", int)
METRICS_PORT = Option("--metrics-port", 0, "port for /metrics (0: off; playback serves it on its HTTP port)",
                      config.port)
LOG_LEVEL = Option("--log-level", "info", "debug, info, warning or error")
NO_DEMO = Option("--no-demo", False, "do not start the demo publisher", config.flag)
UP_GRPC_PORT = Option("--grpc-port", 0, "gRPC port of the in-process relay on 127.0.0.1 (0: any free port)",
                      config.port)
HEALTH_PORT = Option("--grpc-port", 0, "gRPC port for the health service that Consul checks (0: any free port)",
                     config.port)
TLS_CERT = Option("--tls-cert", "", "PEM certificate chain for HTTPS and RTMPS (with --tls-key); empty: neither")
TLS_KEY = Option("--tls-key", "", "PEM private key for HTTPS and RTMPS")
HTTPS_PORT = Option("--https-port", 8443, "HTTPS port (HTTP/2 and HTTP/1.1 by ALPN) when --tls-cert is given",
                    config.port)
TLS = [TLS_CERT, TLS_KEY, HTTPS_PORT]
GATEWAY_HTTPS_PORT = Option("--https-port", 8493, "the gateway's HTTPS port (HTTP/2 and HTTP/1.1) with --tls-cert",
                            config.port)
GATEWAY_PORT = Option("--http-port", 8090, "HTTP port of the gateway's REST API and redirects", config.port)
MAX_CONNECTIONS = Option("--max-connections", 0, "cap on connections to this node's public ports (0: none)",
                         config.non_negative)
MAX_PER_IP = Option("--max-per-ip", 0, "cap on connections from one client address (0: none)", config.non_negative)
HANDSHAKE_TIMEOUT_MS = Option("--handshake-timeout-ms", 10000, "an RTMP or TLS connection must finish its handshake "
                              "within this (ms)", config.positive)
IDLE_TIMEOUT_MS = Option("--idle-timeout-ms", 30000, "a publisher silent this long is disconnected (ms)",
                         config.positive)
HTTP_IDLE_TIMEOUT_MS = Option("--idle-timeout-ms", 60000, "a kept-alive HTTP connection with no request is closed "
                              "after this (ms)", config.positive)
ON_PUBLISH = Option("--on-publish", "", "URL POSTed before a publish starts; a 2xx allows it")
ON_UNPUBLISH = Option("--on-unpublish", "", "URL POSTed when a publish ends")
ON_PLAY = Option("--on-play", "", "URL POSTed before a viewer starts (HTTP-FLV, WebSocket-FLV, RTMP); a 2xx allows")
ON_STOP = Option("--on-stop", "", "URL POSTed when such a viewer leaves")
HOOK_TIMEOUT_MS = Option("--hook-timeout-ms", 3000, "how long a hook may take to answer; no answer denies (ms)",
                         config.positive)
SECRET = Option("--secret", "", "signed URLs for publish and play: one secret, or app=secret,app2=secret2; "
                "empty: off")


def _cidrs(option: str, per_app: bool = True) -> Callable[[str], str]:
    def check(text: str) -> str:
        (parse_per_app if per_app else parse_networks)(text, option)  # a bad list stops the node at start
        return text
    return check


PUBLISH_ALLOW = Option("--publish-allow", "", "who may publish: CIDRs (e.g. 10.0.0.0/8 2001:db8::/32), or per app "
                       "live=CIDRS,studio=CIDRS; empty: anyone", _cidrs("--publish-allow"))
PUBLISH_DENY = Option("--publish-deny", "", "who may not publish (wins over allow): CIDRs or app=CIDRS; 'all' for "
                      "everyone", _cidrs("--publish-deny"))
PLAY_ALLOW = Option("--play-allow", "", "who may play (every protocol): CIDRs or app=CIDRS; empty: anyone",
                    _cidrs("--play-allow"))
PLAY_DENY = Option("--play-deny", "", "who may not play (wins over allow): CIDRs or app=CIDRS", _cidrs("--play-deny"))
TRUSTED_PROXIES = Option("--trusted-proxies", "", "CIDRs of reverse proxies whose X-Forwarded-For names the client "
                         "for the IP lists; empty: the header is ignored", _cidrs("--trusted-proxies", per_app=False))
PUBLISH_ACCESS = [PUBLISH_ALLOW, PUBLISH_DENY, TRUSTED_PROXIES]
PLAY_ACCESS = [PLAY_ALLOW, PLAY_DENY, TRUSTED_PROXIES]
ADMIN_TOKEN = Option("--admin-token", "", "bearer token the gateway's admin calls (kicks) need; empty: none")
REGISTRY = Option("--registry", "dispatch", "where nodes register: dispatch (its Register call) or consul (the "
                  "agent at CONSUL_HTTP_ADDR; dispatch then watches Consul)")

ICE_SERVERS = Option("--webrtc-ice-servers", (), "STUN/TURN servers for WebRTC, comma-separated "
                     "(stun:host:port, turn:host:port); default: none (host candidates only)", config.words)
ICE_USERNAME = Option("--webrtc-ice-username", "", "username for the TURN servers")
ICE_CREDENTIAL = Option("--webrtc-ice-credential", "", "credential for the TURN servers")
WEBRTC_PORTS = Option("--webrtc-ports", None, "UDP ports for WebRTC media, LOW-HIGH (containers publish this "
                      "range); default: any free port", config.port_range)
WEBRTC_BIND = Option("--webrtc-bind", "", "address to receive WebRTC media on (default: every interface but "
                     "loopback)")
WEBRTC_ADVERTISE = Option("--webrtc-advertise", "", "address to name in WebRTC candidates instead of the bound one "
                          "(NAT 1:1, containers: the host's public address)")
MAX_WEBRTC = Option("--max-webrtc", 200, "WebRTC viewers this playback node takes; the next gets 503",
                    config.positive)
WEBRTC_ICE = [ICE_SERVERS, ICE_USERNAME, ICE_CREDENTIAL, WEBRTC_PORTS, WEBRTC_BIND, WEBRTC_ADVERTISE]
WEBRTC = [*WEBRTC_ICE, MAX_WEBRTC]
WHIP_PORT = Option("--http-port", 0, "HTTP port for WHIP publishers, POST /{app}/{stream}/whip (0: none; "
                   "deploy/ uses 8081)", config.port)

def _rules(kind: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        try:
            parse_rules(text, kind)
        except JobError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None  # argparse prints this one's message
        return text
    return check


def _job_rules(cfg: dict[str, Any]) -> list[Rule]:
    return [*parse_rules(cfg["abr"], ABR_KIND), *parse_rules(cfg["record"], RECORD),
            *parse_rules(cfg["forward"], FORWARD), *parse_rules(cfg["pull"], PULL)]


ABR = Option("--abr", "", "ABR ladder rules: APP_PATTERN=LADDER, several separated by ';'. A ladder is "
             "NAME:SIZE:KBPS[:FPS] renditions separated by ',', e.g. live=360p:x360:800k,180p:x180:300k:15 "
             "(SIZE WxH or xH; stream S's rendition is S_NAME). Workers run them; empty: none", _rules(ABR_KIND))
RECORD_RULES = Option("--record", "", "recording rules: APP_PATTERN[=SEGMENT_SECONDS], several separated by ';', e.g. "
                      "'live*;cams=300'. Workers record them; empty: none (the API starts others)", _rules(RECORD))
FORWARD_RULES = Option("--forward", "", "forwarding rules: APP_PATTERN=URL[ URL...], several separated by ';'; a URL "
                       "(rtmp://, rtmps://, srt://) may name {app} and {name}, e.g. "
                       "'live=rtmp://a.example/live/{name}'. Workers push them; empty: none", _rules(FORWARD))
PULL_RULES = Option("--pull", "", "pulled sources: APP/STREAM=URL[ ondemand[=IDLE_SECONDS]], several separated by ';'; "
                    "URL is rtsp://, rtmp://, an HLS playlist's http(s):// or srt://, and may name {app} and {name}; "
                    "a pattern (cams/*) pulls on demand only, e.g. 'cams/*=rtsp://nvr/{name} ondemand'",
                    _rules(PULL))
JOB_RULES = [ABR, RECORD_RULES, FORWARD_RULES, PULL_RULES]
MAX_JOBS = Option("--max-jobs", 4, "ABR ladders this worker runs at once (an encoder each); it takes 50 times as "
                  "many recordings, forwards and pulls", config.positive)
RECORD_DIR = Option("--record-dir", "recordings", "where this worker writes recordings: DIR/APP/STREAM/*.mp4")
RECORD_SEGMENT = Option("--record-segment", 60, "seconds each recording file lasts, unless a rule says otherwise",
                        config.positive)
RECORD_MAX_AGE = Option("--record-max-age", 0.0, "recordings older than this are removed (90m, 12h, 7d; 0: kept)",
                        config.duration)
RECORD_MAX_SIZE = Option("--record-max-size", 0, "the oldest recordings are removed past this total (500M, 10G; "
                         "0: no limit)", config.size)
RECORD_UPLOAD = Option("--record-upload", "", "upload finished recording files to S3: "
                       "s3://BUCKET[/PREFIX]?endpoint=URL&region=R&delete=1 (credentials: AWS_* variables)")
ON_RECORD_SEGMENT = Option("--on-record-segment", "", "URL POSTed when a recording file is finished")
RECORDING = [RECORD_DIR, RECORD_SEGMENT, RECORD_MAX_AGE, RECORD_MAX_SIZE, RECORD_UPLOAD, ON_RECORD_SEGMENT]
FFMPEG = Option("--ffmpeg", "", "the ffmpeg binary workers run (default: imageio-ffmpeg's)")
WORKER_PORT = Option("--grpc-port", 0, "gRPC port for the health service (0: any free port)", config.port)
WORKER_HTTP_PORT = Option("--http-port", 8092, "HTTP port for thumbnails (/{app}/{stream}.jpg) and /metrics; 0: none",
                          config.port)

COMMON = [LOG_LEVEL, ADVERTISE_HOST, CHECK_CONFIG]
HLS = [HLS_SEGMENT_MS, HLS_WINDOW, HLS_PART_MS, HLS_IDLE_MS]
LIMITS = [MAX_CONNECTIONS, MAX_PER_IP]
PUBLISH_HOOKS = [ON_PUBLISH, ON_UNPUBLISH, HOOK_TIMEOUT_MS]
PLAY_HOOKS = [ON_PLAY, ON_STOP, HOOK_TIMEOUT_MS]
UP = [HOST, RTMP_PORT, HTTP_PORT, *TLS, RTMPS_PORT, *SRT, UP_GRPC_PORT, BATCH_MS, MERGE_MS, MAX_LAG_MS, *HLS, *WEBRTC,
      GRACE_MS, SECRET, *LIMITS, PUBLISH_ALLOW, PUBLISH_DENY, PLAY_ALLOW, PLAY_DENY, TRUSTED_PROXIES,
      HANDSHAKE_TIMEOUT_MS, IDLE_TIMEOUT_MS, ON_PUBLISH, ON_UNPUBLISH, ON_PLAY, ON_STOP, HOOK_TIMEOUT_MS, *JOB_RULES,
      MAX_JOBS, *RECORDING, FFMPEG, NO_DEMO, *COMMON]
SERVE = {
    "dispatch": [HOST, DISPATCH_PORT, GRACE_MS, *JOB_RULES, METRICS_PORT, REGISTRY, *COMMON],
    "worker": [HOST, WORKER_PORT, WORKER_HTTP_PORT, DISPATCH, MAX_JOBS, *RECORDING, HOOK_TIMEOUT_MS, FFMPEG, BATCH_MS,
               METRICS_PORT, REGISTRY, *COMMON],
    "relay": [HOST, GRPC_PORT, ROLE, DISPATCH, UPSTREAM, ZONE, ADVERTISE, MAX_LAG_MS, GRACE_MS, METRICS_PORT,
              REGISTRY, *COMMON],
    "ingest": [HOST, RTMP_PORT, TLS_CERT, TLS_KEY, RTMPS_PORT, *SRT, WHIP_PORT, *WEBRTC_ICE, HEALTH_PORT, DISPATCH,
               RELAY, BATCH_MS, METRICS_PORT, REGISTRY, SECRET, *LIMITS, *PUBLISH_ACCESS, HANDSHAKE_TIMEOUT_MS,
               IDLE_TIMEOUT_MS, *PUBLISH_HOOKS, *COMMON],
    "playback": [HOST, HTTP_PORT, *TLS, PLAY_RTMP_PORT, PLAY_RTMPS_PORT, *PLAY_SRT, HEALTH_PORT, DISPATCH, RELAY, ZONE,
                 MERGE_MS, MAX_LAG_MS, *HLS, *WEBRTC, REGISTRY, SECRET, *LIMITS, *PLAY_ACCESS, HANDSHAKE_TIMEOUT_MS,
                 HTTP_IDLE_TIMEOUT_MS, *PLAY_HOOKS, *COMMON],
    "gateway": [HOST, GATEWAY_PORT, TLS_CERT, TLS_KEY, GATEWAY_HTTPS_PORT, HEALTH_PORT, DISPATCH, ADMIN_TOKEN, SECRET,
                REGISTRY, HANDSHAKE_TIMEOUT_MS, HTTP_IDLE_TIMEOUT_MS, *COMMON],
}
WAIT_FOR_PEER = 5.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="castmesh", description="castmesh: a live-streaming cluster (RTMP in, HTTP-FLV out) over gRPC.",
        epilog="Every option can also be set with the CASTMESH_* environment variable shown beside it.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = commands.add_parser(
        "up", help="run every service in one process (no Consul), with a demo stream",
        description="Run dispatch, relay, ingest and playback in one process, talking gRPC over loopback. Publish "
                    "to rtmp://HOST:RTMP_PORT/{app}/{stream}; play http://HOST:HTTP_PORT/{app}/{stream}.flv.")
    config.add_options(up, UP)
    serve = commands.add_parser("serve", help="run one service alone",
                                description="Run one service alone. Nodes find each other through --dispatch "
                                            "(or, for a single relay, --relay).")
    services = serve.add_subparsers(dest="service", required=True, metavar="SERVICE")
    for name, options in SERVE.items():
        config.add_options(services.add_parser(name, help=f"run the {name} service"), options)
    health = commands.add_parser("health", help="ask a node's gRPC health service; exit 0 if it is SERVING "
                                                "(container health checks)")
    health.add_argument("address", help="host:port of the node's gRPC port")
    health.add_argument("--service", default="", help="the service name to ask about (default: the whole node)")
    bench = _bench()
    benches = commands.add_parser("bench", help="benchmarks on loopback (from a source checkout)")
    if bench is not None:
        bench.add_parsers(benches.add_subparsers(dest="bench", required=True, metavar="BENCH"))
    return parser


def _bench() -> ModuleType | None:
    """The benchmarks: castmesh_bench, beside castmesh/ and services/ in a source checkout. They are not
    part of the installed package, so a checkout's root is put on the path for them."""
    root = Path(__file__).resolve().parents[1]
    if (root / "castmesh_bench").is_dir() and str(root) not in sys.path:
        sys.path.append(str(root))
    try:
        import castmesh_bench
    except ImportError:
        return None
    return castmesh_bench


async def _connect(target: str, what: str) -> grpc.aio.Channel:
    chan = grpcutil.channel(target)
    try:
        await grpcutil.wait_ready(chan, f"the {what} at {target}", WAIT_FOR_PEER)
    except ConnectionError:
        await chan.close()
        raise
    return chan


def _advertise(cfg: dict[str, Any], port: int) -> str:
    """The address this node registers: what others (and the gateway's answers) use to reach it."""
    if cfg.get("advertise"):
        return str(cfg["advertise"])
    host = cfg.get("advertise_host") or cfg["host"]
    if host == "auto":
        host = socket.gethostbyname(socket.gethostname())
    return f"{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"


def _node_id(kind: str, cfg: dict[str, Any], port: int) -> str:
    """A node's id in dispatch's directory and in Consul, unique in the cluster: pods and hosts that all
    listen on the same port are told apart by their advertised host; on one machine the port does it."""
    host = _advertise(cfg, port).rsplit(":", 1)[0]
    return f"{kind}-{port}" if host in ("127.0.0.1", "localhost", "[::1]") else f"{kind}-{host}-{port}"


def _check(cfg: dict[str, Any]) -> None:
    """What --check-config validates beyond each option's own type."""
    Signer.parse(cfg.get("secret", ""))
    if cfg.get("registry", "dispatch") not in ("dispatch", "consul"):
        raise ConfigError(f"--registry must be dispatch or consul, not {cfg['registry']!r}")
    if cfg.get("role", "origin") not in ("origin", "edge"):
        raise ConfigError(f"--role must be origin or edge, not {cfg['role']!r}")
    if cfg.get("role") == "edge" and not (cfg.get("upstream") or cfg.get("dispatch")):
        raise ConfigError("an edge relay needs --upstream or --dispatch")


class Wiring:
    """How this process reaches the rest of the cluster: through dispatch, or one fixed relay."""

    def __init__(self, dispatch: DispatchStub | None, relay: str, zone: str = "", registry: str = "dispatch") -> None:
        self.dispatch = dispatch
        self.relay = relay
        self.zone = zone
        self.registry: Registry | None = None
        if registry == "consul":
            self.registry = ConsulRegistry(consul_client())
        elif registry != "dispatch":
            raise ConfigError(f"--registry must be dispatch or consul, not {registry!r}")
        elif dispatch is not None:
            self.registry = DispatchRegistry(dispatch)

    def leases(self, key: StreamKey, holder: str, client: str) -> Lease:
        if self.dispatch is None:
            return FixedLease(self.relay)
        return DispatchLease(self.dispatch, key, holder, client)

    def upstream(self, origin_only: bool = False) -> Locate:
        if self.dispatch is None:
            return fixed_upstream(self.relay)
        return dispatch_upstream(self.dispatch, self.zone, origin_only)

    def register(self, node: Node, load: Callable[[], NodeLoad]) -> None:
        if self.registry is not None:
            self.registry.register(node, load)


def _relay_load(service: RelayService) -> Callable[[], NodeLoad]:
    def load() -> NodeLoad:
        streams = service.table.streams.values()
        return NodeLoad(streams=len(streams), subscribers=sum(len(s.subscribers) for s in streams))

    return load


def _banner(cfg: dict[str, Any], relay_port: int, dispatch_port: int) -> str:
    host = "127.0.0.1" if cfg["host"] in ("0.0.0.0", "::", "") else cfg["host"]
    rtmp, http = cfg["rtmp_port"], cfg["http_port"]
    lines = [
        "castmesh is up: dispatch, relay, ingest, playback and gateway in one process (no Consul)",
        f"  publish  rtmp://{host}:{rtmp}/live/STREAM   (OBS: server rtmp://{host}:{rtmp}/live, key STREAM)",
        f"           http://{host}:{http}/live/STREAM/whip (WHIP: WebRTC, H.264 and Opus)",
        *([f"           srt://{host}:{cfg['srt_port']}?streamid=publish:live/STREAM (SRT: MPEG-TS, H.264/HEVC, AAC)"]
          if cfg["srt_port"] else []),
        f"  play     http://{host}:{http}/live/STREAM.flv (HTTP-FLV, WebSocket-FLV)",
        f"           http://{host}:{http}/live/STREAM.m3u8 (HLS)   rtmp://{host}:{rtmp}/live/STREAM",
        f"           http://{host}:{http}/live/STREAM/whep (WHEP: WebRTC)",
        f"           http://{host}:{http}/live/STREAM.m3u8?format=llhls (low-latency HLS)",
        *([f"           srt://{host}:{cfg['srt_port']}?streamid=read:live/STREAM (SRT: MPEG-TS)"]
          if cfg["srt_port"] else []),
    ]
    if cfg["tls_cert"]:
        lines.append(f"  https    https://{host}:{cfg['https_port']}/ (HTTP/2 and HTTP/1.1: every path above, wss://)")
        if cfg["rtmps_port"]:
            lines.append(f"  rtmps    rtmps://{host}:{cfg['rtmps_port']}/live/STREAM (publish and play)")
    if not cfg["no_demo"]:
        lines.append(f"  demo     ffplay http://{host}:{http}/live/demo.flv")
    lines += [f"  watch    http://{host}:{http}/   (the player page: every live stream, HTTP-FLV, HLS or WebRTC)",
              f"  api      http://{host}:{http}/api/v1/streams   (docs: http://{host}:{http}/docs)",
              f"  metrics  http://{host}:{http}/metrics",
              f"  relay    127.0.0.1:{relay_port} (gRPC)   dispatch 127.0.0.1:{dispatch_port} (gRPC)",
              "Ctrl-C stops."]
    return "\n".join(lines)


async def up(cfg: dict[str, Any]) -> int:
    stop = runtime.stop_event()
    max_lag, grace = cfg["max_lag_ms"] / 1000, cfg["grace_ms"] / 1000
    closers: list[Callable[[], Awaitable[None]]] = []
    try:
        dispatch_server, dispatch_port, dispatcher = await dispatch_service.start(
            "127.0.0.1", 0, InMemoryDirectory(grace), JobBoard(_job_rules(cfg)))
        closers.append(lambda: dispatch_server.stop(grace=1))
        closers.append(dispatcher.close)
        chan = await _connect(f"127.0.0.1:{dispatch_port}", "dispatch")
        closers.append(chan.close)
        wiring = Wiring(DispatchStub(chan), "")
        # The public ports first: if one is taken, fail before anything registers or logs.
        signer = Signer.parse(cfg["secret"])
        ingest = _ingest(cfg, wiring, signer, closers)
        closers.append(ingest.links.close)
        rtmp = ingest.rtmp()  # one RTMP port for publish and play: the plays go to playback, below
        closers.append(_closing(await rtmp.listen(cfg["host"], cfg["rtmp_port"])))
        if cfg["rtmps_port"] and (rtmps := _tls(cfg, alpn=None)) is not None:
            closers.append(_closing(await rtmp.listen_tls(cfg["host"], cfg["rtmps_port"], rtmps, "ingest")))
        catalog = Catalog(wiring.dispatch)
        closers.append(catalog.close)
        playback = Playback(wiring.upstream(), _playback_settings(cfg), list_streams=catalog.streams,
                            list_jobs=catalog.jobs, signer=signer,
                            caps=_caps("playback", cfg), hooks=_hooks(cfg, "on_play", "on_stop"),
                            access=ingest.access)
        rtmp.plays = playback
        await _listen_srt(cfg, closers, SrtIngest(ingest), playback.srt_viewers())  # one SRT port, likewise
        # WHIP on the one HTTP port
        playback.whip = WhipIngest(ingest, playback.settings.ice, cfg["handshake_timeout_ms"] / 1000,
                                   cfg["idle_timeout_ms"] / 1000, ingest.caps, ingest.access)
        closers.append(playback.links.close)
        closers.append(_closing(await playback.listen(cfg["host"], cfg["http_port"])))
        if (context := _tls(cfg)) is not None:
            closers.append(_closing(await playback.listen_tls(cfg["host"], cfg["https_port"], context)))
        assert wiring.registry is not None
        closers.append(wiring.registry.close)
        relay = RelayService(max_lag=max_lag, grace=grace, node_id="relay-origin")
        relay_server, relay_port = await relay_service.start("127.0.0.1", cfg["grpc_port"], relay)
        closers.append(lambda: relay_server.stop(grace=1))
        wiring.register(Node(id="relay-origin", role=NODE_ROLE_ORIGIN, address=f"127.0.0.1:{relay_port}"),
                        _relay_load(relay))
        # Ingest and playback are nodes too, so that the gateway's answers and kicks work as in a cluster.
        admin_port = await _health_server({"host": "127.0.0.1", "grpc_port": 0}, closers,
                                          lambda r: ingest.kick(r.stream, r.reason) if r.stream.name
                                          else playback.kick(r.client_id, r.reason))
        _register_ingest(wiring, ingest, cfg, admin_port)
        _register_playback(wiring, playback, cfg, cfg["rtmp_port"], admin_port)
        worker = _start_worker(cfg, wiring, "worker", admin_port, closers, cfg["http_port"])
        playback.thumbnails = worker.thumbnails  # on the one HTTP port
        assert worker.recordings is not None
        recordings = LocalRecordings(worker.recordings, worker.node.id)
        playback.recordings = RecordingRoutes(recordings)
        # The gateway listens on loopback; the public HTTP port hands it /api/v1/..., /healthz and /docs.
        assert wiring.dispatch is not None
        gateway = web.AppRunner(Gateway(wiring.dispatch, catalog, signer=signer, recordings=recordings).app(),
                                access_log=None)
        await gateway.setup()
        gateway_socket = socket.create_server(("127.0.0.1", 0))
        await web.SockSite(gateway, gateway_socket).start()
        closers.append(gateway.cleanup)
        playback.forward_to(f"http://127.0.0.1:{gateway_socket.getsockname()[1]}")
        closers.append(playback.close)
        await _wait_registered(wiring)
        print(_banner(cfg, relay_port, dispatch_port), flush=True)
        demo = None
        if not cfg["no_demo"]:
            url = f"rtmp://127.0.0.1:{cfg['rtmp_port']}/live/demo"
            if signer.enabled:
                url += f"?{signer.query('live', 'demo', ttl=365 * 86400)}"
            demo = asyncio.get_running_loop().create_task(run_demo(url, stop))
        await runtime.until_stopped(stop)
        if demo is not None:
            await demo
    finally:
        for close in reversed(closers):
            await close()
    return 0


async def _wait_registered(wiring: Wiring) -> None:
    """`up` starts taking publishes only once its relay is in the directory."""
    assert wiring.dispatch is not None
    for _ in range(100):
        if (await wiring.dispatch.ListNodes(ListNodesRequest())).nodes:
            return
        await asyncio.sleep(0.02)


async def _listen_srt(cfg: dict[str, Any], closers: list[Callable[[], Awaitable[None]]],
                      publishes: SrtSide | None, plays: SrtSide | None) -> str:
    """The node's SRT port, if --srt-port is not 0; the banner's words for it."""
    if not cfg["srt_port"]:
        return ""
    # a publisher is given --idle-timeout-ms; a player only libsrt's own 5 s (playback's is HTTP keep-alive's)
    idle = cfg["idle_timeout_ms"] / 1000 if publishes is not None else 5.0
    srt = SrtServer(publishes, plays, parse_passphrases(cfg["srt_passphrase"]), cfg["srt_latency_ms"],
                    cfg["srt_max_bw"], idle)
    stop = await srt.listen(cfg["host"], cfg["srt_port"])

    async def close() -> None:
        stop()
    closers.append(close)
    return f", {cfg['srt_port']} (SRT)"


def _register_ingest(wiring: Wiring, ingest: Ingest, cfg: dict[str, Any], grpc_port: int) -> None:
    rtmps = str(cfg["rtmps_port"]) if cfg.get("tls_cert") and cfg.get("rtmps_port") else ""
    wiring.register(Node(id=ingest.node_id, role=NODE_ROLE_INGEST, address=_advertise(cfg, cfg["rtmp_port"]),
                         meta={"rtmp": str(cfg["rtmp_port"]), "rtmps": rtmps, "grpc": str(grpc_port),
                               "srt": str(cfg.get("srt_port") or "")}),
                    lambda: NodeLoad(streams=len(ingest.sessions)))


def _register_playback(wiring: Wiring, playback: Playback, cfg: dict[str, Any], rtmp_port: int,
                       grpc_port: int) -> None:
    """A playback node: its HTTP port is its address; RTMP play (0: none), HTTPS ("": none) and its gRPC port
    in meta."""
    tls = bool(cfg.get("tls_cert"))
    meta = {"http": str(cfg["http_port"]), "rtmp": str(rtmp_port or ""), "grpc": str(grpc_port),
            "https": str(cfg["https_port"]) if tls else "", "rtmps": str(cfg.get("rtmps_port") or "") if tls else "",
            "srt": str(cfg.get("srt_port") or "")}
    wiring.register(Node(id=playback.node_id, role=NODE_ROLE_PLAYBACK, address=_advertise(cfg, cfg["http_port"]),
                         zone=cfg.get("zone", ""), meta=meta),
                    lambda: NodeLoad(streams=len(playback.feeds), subscribers=len(playback.clients)))


def _start_worker(cfg: dict[str, Any], wiring: Wiring, node_id: str, grpc_port: int,
                  closers: list[Callable[[], Awaitable[None]]], http_port: int) -> Worker:
    """A worker: its own publish side (sessions named after it), registered, taking jobs from dispatch."""
    assert wiring.dispatch is not None
    ingest = Ingest(wiring.leases, cfg["batch_ms"], node_id=node_id)
    closers.append(ingest.links.close)
    node = Node(id=node_id, role=NODE_ROLE_WORKER, address=_advertise(cfg, grpc_port),
                meta={"grpc": str(grpc_port), "jobs": str(cfg["max_jobs"]), "http": str(http_port or "")})
    hooks = _hooks(cfg, "on_record_segment")
    closers.append(hooks.close)
    uploader = None
    if cfg["record_upload"]:
        uploader = Uploader(parse_s3_url(cfg["record_upload"]), Path(cfg["record_dir"]))
        uploader.start()
        closers.append(uploader.close)
    recordings = Recordings(RecordSettings(Path(cfg["record_dir"]), cfg["record_segment"], cfg["record_max_age"],
                                           cfg["record_max_size"]), node_id, hooks, uploader)
    recordings.start()
    closers.append(recordings.close)
    worker = Worker(wiring.dispatch, node, ingest, wiring.upstream(origin_only=True),
                    cfg["ffmpeg"] or imageio_ffmpeg.get_ffmpeg_exe(), cfg["max_jobs"], recordings)
    worker.start()
    closers.append(worker.close)
    wiring.register(node, worker.load)
    return worker


def _caps(name: str, cfg: dict[str, Any]) -> ConnectionCaps:
    return ConnectionCaps(name, cfg["max_connections"], cfg["max_per_ip"])


def _ingest(cfg: dict[str, Any], wiring: Wiring, signer: Signer, closers: list[Callable[[], Awaitable[None]]],
            node_id: str = "ingest") -> Ingest:
    hooks = _hooks(cfg, "on_publish", "on_unpublish")
    closers.append(hooks.close)
    return Ingest(wiring.leases, cfg["batch_ms"], node_id=node_id, signer=signer, caps=_caps("ingest", cfg),
                  access=AccessLists.from_config(cfg),
                  handshake_timeout=cfg["handshake_timeout_ms"] / 1000, idle_timeout=cfg["idle_timeout_ms"] / 1000,
                  hooks=hooks)


def _hooks(cfg: dict[str, Any], *actions: str) -> Hooks:
    return Hooks({action: cfg[action] for action in actions}, cfg["hook_timeout_ms"] / 1000)


def _playback_settings(cfg: dict[str, Any]) -> PlaybackSettings:
    return PlaybackSettings(merge_ms=cfg["merge_ms"], max_lag=cfg["max_lag_ms"] / 1000,
                            hls_segment_ms=cfg["hls_segment_ms"], hls_window=cfg["hls_window"],
                            hls_part_ms=cfg["hls_part_ms"],
                            hls_idle=cfg["hls_idle_ms"] / 1000, handshake_timeout=cfg["handshake_timeout_ms"] / 1000,
                            idle_timeout=cfg["idle_timeout_ms"] / 1000, max_webrtc=cfg["max_webrtc"],
                            ice=_ice(cfg))


def _ice(cfg: dict[str, Any]) -> IceSettings:
    return IceSettings(servers=cfg["webrtc_ice_servers"], username=cfg["webrtc_ice_username"],
                       credential=cfg["webrtc_ice_credential"], bind=cfg["webrtc_bind"], ports=cfg["webrtc_ports"],
                       advertise=cfg["webrtc_advertise"])


async def _serve_app(app: web.Application, host: str, port: int) -> Callable[[], Awaitable[None]]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(f"cannot listen on {host}:{port} (HTTP): {exc.strerror or exc}") from exc
    return runner.cleanup


def _closing(server: asyncio.Server) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        server.close()

    return close


async def serve(service: str, cfg: dict[str, Any]) -> int:
    stop = runtime.stop_event()
    if cfg.get("metrics_port"):
        from prometheus_client import start_http_server

        start_http_server(cfg["metrics_port"], addr=cfg["host"])
    closers: list[Callable[[], Awaitable[None]]] = []
    try:
        if service == "gateway":
            await _serve_gateway(cfg, closers)
            await runtime.until_stopped(stop)
            return 0  # (it registers itself as a node in _serve_gateway)
        if service == "dispatch":
            directory: Directory = InMemoryDirectory(cfg["grace_ms"] / 1000)
            source = "in memory"
            if cfg["registry"] == "consul":
                consul_directory = ConsulDirectory(consul_client(), cfg["grace_ms"] / 1000)
                consul_directory.start()
                closers.append(consul_directory.close)
                nodes = ConsulNodes(consul_client(), consul_directory.add_node, consul_directory.remove_node,
                                    consul_directory.update_load)
                nodes.start()
                closers.append(nodes.close)
                directory, source = consul_directory, "in Consul"
            server, port, dispatcher = await dispatch_service.start(cfg["host"], cfg["grpc_port"], directory,
                                                                    JobBoard(_job_rules(cfg)))
            closers.append(lambda: server.stop(grace=1))
            closers.append(dispatcher.close)
            if cfg["registry"] == "consul":  # listed in Consul like every service (it has no Register call)
                registry = ConsulRegistry(consul_client())
                closers.append(registry.close)
                registry.register(Node(id=f"dispatch-{port}", role=NODE_ROLE_DISPATCH, address=_advertise(cfg, port),
                                       meta={"grpc": str(port)}), NodeLoad)
            print(f"castmesh dispatch listening on {cfg['host']}:{port} (gRPC); directory {source}", flush=True)
            await runtime.until_stopped(stop)
            return 0
        if service == "worker" and not cfg["dispatch"]:
            raise ConfigError("a worker needs --dispatch: jobs come from dispatch")
        dispatch = None
        if cfg.get("dispatch"):
            chan = await _connect(cfg["dispatch"], "dispatch")
            closers.append(chan.close)
            dispatch = DispatchStub(chan)
        elif service != "relay":
            closers.append((await _connect(cfg["relay"], "relay")).close)  # fail early, with a clear message
        wiring = Wiring(dispatch, cfg.get("relay", ""), cfg.get("zone", ""), cfg["registry"])
        if wiring.registry is not None:
            closers.append(wiring.registry.close)
        if service == "relay":
            await _serve_relay(cfg, wiring, closers)
        elif service == "worker":
            health_port = await _health_server(cfg, closers)
            node_id = _node_id("worker", cfg, cfg["http_port"] or health_port)
            worker = _start_worker(cfg, wiring, node_id, health_port, closers, cfg["http_port"])
            if cfg["http_port"]:
                app = thumbnail_app(worker.thumbnails)
                assert worker.recordings is not None
                recording_routes(app, worker.recordings, node_id)
                closers.append(await _serve_app(app, cfg["host"], cfg["http_port"]))
            print(f"castmesh worker {node_id} listening for jobs (up to {cfg['max_jobs']}), {_peer_text(cfg)}",
                  flush=True)
        elif service == "ingest":
            ingest = _ingest(cfg, wiring, Signer.parse(cfg["secret"]), closers,
                             node_id=_node_id("ingest", cfg, cfg["rtmp_port"]))
            closers.append(ingest.links.close)
            rtmp_server = ingest.rtmp()
            closers.append(_closing(await rtmp_server.listen(cfg["host"], cfg["rtmp_port"])))
            whip = ""
            if cfg["rtmps_port"] and (rtmps := _tls(cfg, alpn=None)) is not None:
                closers.append(_closing(await rtmp_server.listen_tls(cfg["host"], cfg["rtmps_port"], rtmps, "ingest")))
                whip = f", {cfg['rtmps_port']} (RTMPS)"
            whip += await _listen_srt(cfg, closers, SrtIngest(ingest), None)
            if cfg["http_port"]:
                app = whip_app(WhipIngest(ingest, _ice(cfg), cfg["handshake_timeout_ms"] / 1000,
                                          cfg["idle_timeout_ms"] / 1000, ingest.caps, ingest.access))
                closers.append(await _serve_app(app, cfg["host"], cfg["http_port"]))
                whip += f", {cfg['host']}:{cfg['http_port']} (WHIP)"
            health_port = await _health_server(cfg, closers, lambda r: ingest.kick(r.stream, r.reason))
            _register_ingest(wiring, ingest, cfg, health_port)
            print(f"castmesh ingest listening on {cfg['host']}:{cfg['rtmp_port']} (RTMP){whip}, "
                  f"{_peer_text(cfg)}", flush=True)
        else:
            node_id = _node_id("playback", cfg, cfg["http_port"])
            catalog = Catalog(wiring.dispatch, "" if wiring.dispatch is not None else wiring.relay)
            closers.append(catalog.close)
            playback = Playback(wiring.upstream(), _playback_settings(cfg), node_id=node_id,
                                list_streams=catalog.streams, list_jobs=catalog.jobs,
                                signer=Signer.parse(cfg["secret"]),
                                caps=_caps("playback", cfg), hooks=_hooks(cfg, "on_play", "on_stop"),
                                access=AccessLists.from_config(cfg))
            closers.append(playback.close)
            closers.append(playback.links.close)
            thumbnails = RemoteThumbnails(catalog.workers)  # from the worker that makes them
            closers.append(thumbnails.close)
            playback.thumbnails = thumbnails
            remote_recordings = RemoteRecordings(catalog.workers)
            closers.append(remote_recordings.close)
            playback.recordings = RecordingRoutes(remote_recordings)
            closers.append(_closing(await playback.listen(cfg["host"], cfg["http_port"])))
            if (context := _tls(cfg)) is not None:
                closers.append(_closing(await playback.listen_tls(cfg["host"], cfg["https_port"], context)))
            if cfg["rtmp_port"]:
                closers.append(_closing(await playback.listen_rtmp(cfg["host"], cfg["rtmp_port"])))
            if cfg["rtmps_port"] and (rtmps := _tls(cfg, alpn=None)) is not None:
                closers.append(_closing(await playback.listen_rtmp(cfg["host"], cfg["rtmps_port"], rtmps)))
            srt = await _listen_srt(cfg, closers, None, playback.srt_viewers())
            health_port = await _health_server(cfg, closers, lambda r: playback.kick(r.client_id, r.reason))
            _register_playback(wiring, playback, cfg, cfg["rtmp_port"], health_port)
            rtmp = f", {cfg['rtmp_port']} (RTMP play)" if cfg["rtmp_port"] else ""
            rtmp += srt
            rtmp += f", {cfg['https_port']} (HTTPS: HTTP/2, HTTP/1.1)" if cfg["tls_cert"] else ""
            rtmp += f", {cfg['rtmps_port']} (RTMPS play)" if cfg["tls_cert"] and cfg["rtmps_port"] else ""
            print(f"castmesh playback listening on {cfg['host']}:{cfg['http_port']} (HTTP-FLV){rtmp}, "
                  f"{_peer_text(cfg)}", flush=True)
        await runtime.until_stopped(stop)
    finally:
        for close in reversed(closers):
            await close()
    return 0


async def _serve_gateway(cfg: dict[str, Any], closers: list[Callable[[], Awaitable[None]]]) -> None:
    if not cfg["dispatch"]:
        raise ConfigError("the gateway needs --dispatch")
    chan = await _connect(cfg["dispatch"], "dispatch")
    closers.append(chan.close)
    dispatch = DispatchStub(chan)
    catalog = Catalog(dispatch)
    closers.append(catalog.close)
    runner = web.AppRunner(Gateway(dispatch, catalog, admin_token=cfg["admin_token"],
                                   signer=Signer.parse(cfg["secret"])).app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg["host"], cfg["http_port"], reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(f"cannot listen on {cfg['host']}:{cfg['http_port']} (gateway HTTP): {exc.strerror or exc}") \
            from exc
    closers.append(runner.cleanup)
    https = ""
    if (context := _tls(cfg)) is not None:
        # aiohttp speaks HTTP/1.1 only: the HTTPS port is playback's HTTP/2 and HTTP/1.1 sessions, each request
        # handed to the gateway on a loopback port.
        loopback = socket.create_server(("127.0.0.1", 0))
        await web.SockSite(runner, loopback).start()
        forwarder = Forwarder(f"http://127.0.0.1:{loopback.getsockname()[1]}")
        closers.append(forwarder.close)
        handshake, idle = cfg["handshake_timeout_ms"] / 1000, cfg["idle_timeout_ms"] / 1000
        closers.append(_closing(await serve_tls(cfg["host"], cfg["https_port"], context, by_alpn(
            lambda: HttpSession(forwarder.route, lambda _: None, None, handshake, idle),
            lambda: H2Session(forwarder.route, lambda _: None, None, idle)), handshake, "gateway")))
        https = f", {cfg['https_port']} (HTTPS: HTTP/2, HTTP/1.1)"
    wiring = Wiring(dispatch, "", registry=cfg["registry"])
    if wiring.registry is not None:
        closers.append(wiring.registry.close)
    health_port = await _health_server(cfg, closers)
    wiring.register(Node(id=f"gateway-{cfg['http_port']}", role=NODE_ROLE_GATEWAY,
                         address=_advertise(cfg, cfg["http_port"]),
                         meta={"http": str(cfg["http_port"]), "grpc": str(health_port)}), NodeLoad)
    print(f"castmesh gateway listening on {cfg['host']}:{cfg['http_port']} (HTTP){https}, dispatch {cfg['dispatch']}",
          flush=True)


def _tls(cfg: dict[str, Any], alpn: list[str] | None = HTTPS_ALPN) -> ssl.SSLContext | None:
    """The TLS context from --tls-cert and --tls-key (HTTPS: offering h2 and http/1.1), or None when they are
    not given."""
    if not cfg["tls_cert"] and not cfg["tls_key"]:
        return None
    if not cfg["tls_cert"] or not cfg["tls_key"]:
        raise ConfigError("HTTPS needs both --tls-cert and --tls-key")
    try:
        context = tls_context(cfg["tls_cert"], cfg["tls_key"], alpn)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate or key: {exc}") from exc
    return context


async def _health(address: str, service: str) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpcutil.channel(address) as chan:
        try:
            reply = await health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(service=service),
                                                                 timeout=3)
        except grpc.aio.AioRpcError as exc:
            print(f"{address}: {exc.code().name}", file=sys.stderr)
            return 1
    print(f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


async def _health_server(cfg: dict[str, Any], closers: list[Callable[[], Awaitable[None]]],
                         kick: Callable[[KickRequest], int] | None = None) -> int:
    """The gRPC port of a node that serves no other gRPC (ingest, playback): the health service Consul checks
    and the Admin service the gateway kicks through."""
    server = grpcutil.server()
    health = grpcutil.add_health(server)
    if kick is not None:
        add_admin(server, kick)
    port = grpcutil.bind(server, cfg["host"], cfg["grpc_port"], "gRPC health")
    await server.start()
    await grpcutil.mark_serving(health)
    closers.append(lambda: server.stop(grace=0.5))
    return port


def _peer_text(cfg: dict[str, Any]) -> str:
    return f"dispatch {cfg['dispatch']}" if cfg.get("dispatch") else f"relay {cfg['relay']}"


async def _serve_relay(cfg: dict[str, Any], wiring: Wiring, closers: list[Callable[[], Awaitable[None]]]) -> None:
    role = cfg["role"]
    if role not in ("origin", "edge"):
        raise ConfigError(f"--role must be origin or edge, not {role!r}")
    locate = None
    if role == "edge":
        if cfg["upstream"]:
            locate = fixed_upstream(cfg["upstream"])
        elif wiring.dispatch is not None:
            locate = wiring.upstream(origin_only=True)
        else:
            raise ConfigError("an edge relay needs --upstream or --dispatch")
    node_id = _node_id(f"relay-{role}", cfg, cfg["grpc_port"])
    relay = RelayService(max_lag=cfg["max_lag_ms"] / 1000, grace=cfg["grace_ms"] / 1000, role=role, locate=locate,
                         node_id=node_id)
    server, port = await relay_service.start(cfg["host"], cfg["grpc_port"], relay)
    closers.append(lambda: server.stop(grace=1))
    closers.append(relay.links.close)
    wiring.register(Node(id=node_id, role=NODE_ROLE_ORIGIN if role == "origin" else NODE_ROLE_EDGE,
                         address=_advertise(cfg, port), zone=cfg["zone"]), _relay_load(relay))
    print(f"castmesh relay ({role}) listening on {cfg['host']}:{port} (gRPC)"
          + (f", dispatch {cfg['dispatch']}" if cfg["dispatch"] else ""), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "bench":
            bench = _bench()
            if bench is None:
                print("castmesh bench runs from a source checkout (git clone, then make up or make test)",
                      file=sys.stderr)
                return 2
            return bench.run(args)
        if args.command == "health":
            return runtime.run(_health(args.address, args.service))
        options = UP if args.command == "up" else SERVE[args.service]
        cfg = config.resolve(args, options)
        if cfg["check_config"]:
            _check(cfg)
            print(json.dumps({k: v for k, v in cfg.items() if k not in ("secret", "admin_token")}, sort_keys=True))
            return 0
        logs.setup(cfg["log_level"])
        tracing.setup("castmesh" if args.command == "up" else f"castmesh-{args.service}")
        try:
            if args.command == "up":
                return runtime.run(up(cfg))
            return runtime.run(serve(args.service, cfg))
        finally:
            tracing.shutdown()
    except (OSError, ConnectionError, ConfigError) as exc:
        print(f"castmesh: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
