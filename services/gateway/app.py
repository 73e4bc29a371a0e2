"""The gateway: the REST face of a cluster for operators and client apps (aiohttp).

  GET /api/v1/streams                          live streams: publisher, codecs, size, bitrate, viewers, nodes
  GET /api/v1/streams/{app}/{stream}           one of them, or a 404 problem
  GET /api/v1/streams/{app}/{stream}/play      "which server for stream X": {url, node, protocol}
        ?protocol=flv|hls|rtmp|ws|webrtc       (flv by default; webrtc: the WHEP URL)
  GET /api/v1/publish/{app}/{stream}           the RTMP URL of the ingest a publisher should use
  GET /{app}/{stream}.flv, .m3u8               302 to the chosen playback node (ffplay, mpegts.js follow it)
  GET /{app}/{stream}.jpg                      302 to the worker that makes the stream's thumbnail
  GET /api/v1/nodes                            every registered node with role, zone, health and load
  GET /api/v1/jobs                             jobs (ABR ladders): source, renditions, worker, state
  POST /api/v1/streams/{app}/{stream}/abr      start a ladder for a live stream: {"ladder": "360p:x360:800k,..."}
  DELETE /api/v1/streams/{app}/{stream}/abr    stop it
  DELETE /api/v1/streams/{app}/{stream}        kick the publisher (at the ingest holding the stream)
  DELETE /api/v1/clients/{id}                  kick one viewer (ids from the stream's "clients")
  GET /healthz, /metrics, /openapi.json (OpenAPI 3.1), /docs

Playback nodes for a stream are chosen by consistent hashing with bounded loads (castmesh.mesh.ring):
a stream's viewers pack onto few nodes, none above (1 + epsilon) x the average. A node's load is what it
last reported (its viewers) plus what this gateway sent it since. Errors are RFC 9457 problem details.
Listings are at most a second old (catalog.LISTING_TTL): one gathering at a time, shared by every caller.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections import defaultdict, deque
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import grpc
from aiohttp import web
from async_lru import alru_cache
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from castmesh.media.frames import stream_key, stream_path
from castmesh.mesh import grpcutil, tracing
from castmesh.mesh.auth import Signer
from castmesh.mesh.catalog import LISTING_TTL, Catalog
from castmesh.mesh.jobs import (
    ABR,
    FORWARD,
    IDLE_SECONDS,
    PULL,
    RECORD,
    SEGMENT_SECONDS,
    ladder_text,
    parse_ladder,
)
from castmesh.mesh.logs import event
from castmesh.mesh.ring import BoundedRing
from castmesh.mesh.targets import masked
from castmesh.proto.v1.admin_pb2 import KickRequest
from castmesh.proto.v1.admin_pb2_grpc import AdminStub
from castmesh.proto.v1.dispatch_pb2 import (
    NODE_ROLE_INGEST,
    NODE_ROLE_PLAYBACK,
    NODE_ROLE_WORKER,
    ForwardTarget,
    Job,
    JobSpec,
    ListJobsRequest,
    ListNodesReply,
    ListNodesRequest,
    ListStreamsRequest,
    Node,
    NodeRole,
)
from castmesh.proto.v1.dispatch_pb2_grpc import DispatchStub
from services.gateway.openapi import DOCUMENT, docs_page
from services.playback.recordings import SpanError
from services.playback.recordings import span as recording_span
from services.worker.recordings import RecordingSource, RemoteRecordings, overlapping, spans
from services.worker.thumbs import pick_worker, worker_url

log = logging.getLogger("castmesh.gateway")

ANSWERS = Counter("castmesh_gateway_placements", "Which-server answers and redirects", ["protocol"])
PROTOCOLS = ("flv", "hls", "rtmp", "ws", "webrtc", "srt")
NAME = r"[A-Za-z0-9_.~-]{1,256}"
RECENT = 3.0  # seconds an answer counts toward a node's load, until its own report includes the viewer
TIMEOUT = 2.0


def problem(status: int, title: str, detail: str = "") -> web.Response:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    return web.Response(body=json.dumps(body).encode(), status=status,
                        headers={"Content-Type": "application/problem+json"})


class Gateway:
    def __init__(self, dispatch: DispatchStub, catalog: Catalog, epsilon: float = 0.25, admin_token: str = "",
                 signer: Signer | None = None, recordings: RecordingSource | None = None) -> None:
        self.dispatch = dispatch
        self.recordings = recordings or RemoteRecordings(catalog.workers)
        self.signer = signer or Signer()
        self.admin_token = admin_token
        self.admin_channels = grpcutil.ChannelPool()
        self.catalog = catalog
        self.epsilon = epsilon
        self.sent: dict[str, deque[float]] = defaultdict(deque)  # node id -> when this gateway sent viewers
        self.http: aiohttp.ClientSession | None = None
        self.listing = alru_cache(maxsize=1, ttl=LISTING_TTL)(self._listing)

    def app(self) -> web.Application:
        application = web.Application(middlewares=[self._traced, self._problems])
        r = application.router
        r.add_get("/api/v1/streams", self.streams)
        r.add_get(f"/api/v1/streams/{{app:{NAME}}}/{{stream:{NAME}}}", self.stream)
        r.add_get(f"/api/v1/streams/{{app:{NAME}}}/{{stream:{NAME}}}/play", self.play)
        r.add_get(f"/api/v1/publish/{{app:{NAME}}}/{{stream:{NAME}}}", self.publish)
        r.add_get("/api/v1/nodes", self.nodes)
        r.add_get("/api/v1/jobs", self.jobs)
        r.add_post(f"/api/v1/streams/{{app:{NAME}}}/{{stream:{NAME}}}/abr", self.start_ladder)
        r.add_delete(f"/api/v1/streams/{{app:{NAME}}}/{{stream:{NAME}}}/abr", self.stop_ladder)
        r.add_post(f"/api/v1/streams/{{app:{NAME}}}/{{stream:{NAME}}}/record", self.start_recording)
        r.add_delete(f"/api/v1/streams/{{app:{NAME}}}/{{stream:{NAME}}}/record", self.stop_recording)
        r.add_post(f"/api/v1/streams/{{app:{NAME}}}/{{stream:{NAME}}}/forward", self.start_forward)
        r.add_delete(f"/api/v1/streams/{{app:{NAME}}}/{{stream:{NAME}}}/forward", self.stop_forward)
        r.add_post(f"/api/v1/streams/{{app:{NAME}}}/{{stream:{NAME}}}/pull", self.start_pull)
        r.add_delete(f"/api/v1/streams/{{app:{NAME}}}/{{stream:{NAME}}}/pull", self.stop_pull)
        r.add_get("/api/v1/recordings", self.recorded_streams)
        r.add_get(f"/api/v1/recordings/{{app:{NAME}}}/{{stream:{NAME}}}", self.recorded)
        r.add_delete(f"/api/v1/streams/{{app:{NAME}}}/{{stream:{NAME}}}", self.kick_publisher)
        r.add_delete("/api/v1/clients/{id:[A-Za-z0-9_.:-]{1,200}}", self.kick_client)
        r.add_get("/healthz", self.healthz)
        r.add_get("/openapi.json", self.openapi)
        r.add_get("/docs", self.docs)
        r.add_get("/metrics", self.metrics)
        r.add_get(f"/{{app:{NAME}}}/{{file:{NAME}}}", self.redirect)
        application.on_cleanup.append(self._close)
        return application

    @web.middleware
    async def _traced(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Each request is a server span (a child of the caller's, given a traceparent header); the gRPC
        calls made for it are its children. The span is named by route, not by path, to keep names few."""
        resource = request.match_info.route.resource
        span = tracing.http_span(request.method, resource.canonical if resource else "unmatched", request.path,
                                 request.headers)
        status = 500
        try:
            with tracing.current(span):
                response: web.StreamResponse = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:  # redirects are raised
            status = exc.status
            raise
        finally:
            tracing.http_done(span, status)

    @web.middleware
    async def _problems(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            detail = exc.text or ""
            return problem(exc.status, exc.reason, "" if detail == f"{exc.status}: {exc.reason}" else detail)
        except grpc.aio.AioRpcError as exc:
            event(log, "gateway.dispatch_failed", level=logging.WARNING, error=exc.code().name)
            return problem(503, "Service Unavailable", f"dispatch did not answer: {exc.code().name}")

    async def _close(self, application: web.Application) -> None:
        await self.listing.cache_close()
        if self.http is not None:
            await self.http.close()
        if isinstance(self.recordings, RemoteRecordings):
            await self.recordings.close()
        await self.admin_channels.close()

    # Streams --------------------------------------------------------------------------------------------

    async def _listing(self) -> list[dict[str, Any]]:
        listed, described, nodes, jobs = await asyncio.gather(
            self.dispatch.ListStreams(ListStreamsRequest(), timeout=TIMEOUT), self.catalog.streams(),
            self._nodes(), self.catalog.jobs())
        ladders = {stream_path(j.spec.stream): list(j.outputs) for j in jobs if j.state == Job.STATE_RUNNING}
        made = {f"{j.spec.stream.vhost}/{j.spec.stream.app}/{out}": j.spec.stream.name
                for j in jobs for out in j.outputs}
        media = {stream_path(s.stream): s for s in described}
        viewers, clients = await self._viewers([e.node for e in nodes.nodes if e.node.role == NODE_ROLE_PLAYBACK])
        out = []
        for info in listed.streams:
            path = stream_path(info.stream)
            stats = media.get(path)
            m = stats.media if stats is not None else None
            short = f"{info.stream.app}/{info.stream.name}"
            watching = viewers.get(short, {})
            out.append({
                "app": info.stream.app, "stream": info.stream.name, "vhost": info.stream.vhost,
                "publisher": {"holder": info.holder, "client_addr": info.client_addr},
                "origin": info.origin, "since_us": info.since_us,
                "publishing": stats.publishing if stats is not None else True,
                "video": m.video_codec if m else "", "audio": m.audio_codec if m else "",
                "width": m.width if m else 0, "height": m.height if m else 0,
                "fps": m.frame_rate if m else 0.0, "bitrate_kbps": m.bitrate_kbps if m else 0,
                "viewers": sum(watching.values()), "nodes": sorted(watching), "clients": clients.get(short, []),
                "renditions": ladders.get(path, []), "rendition_of": made.get(path, ""),
            })
        return sorted(out, key=lambda s: (s["app"], s["stream"]))

    async def _viewers(self, playback: list[Node]) -> tuple[dict[str, dict[str, int]], dict[str, list[Any]]]:
        """From each playback node's /api/viewers: stream -> {node id: viewers there} (HLS clients included),
        and stream -> the connected viewers (FLV, WebSocket, RTMP) with their ids, for kicks."""
        if self.http is None:
            self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT))
        http = self.http

        async def ask(node: Node) -> tuple[str, dict[str, Any]]:
            try:
                async with http.get(f"http://{node.address}/api/viewers") as answer:
                    return node.id, await answer.json()
            except (TimeoutError, aiohttp.ClientError, ValueError):
                return node.id, {}

        counts: dict[str, dict[str, int]] = defaultdict(dict)
        clients: dict[str, list[Any]] = defaultdict(list)
        for node_id, reply in await asyncio.gather(*(ask(n) for n in playback)):
            for path, count in (reply.get("streams") or {}).items():
                if count:
                    counts[path][node_id] = count
            for path, connected in (reply.get("clients") or {}).items():
                clients[path] += [{**c, "node": node_id} for c in connected]
        return counts, clients

    async def streams(self, request: web.Request) -> web.Response:
        return web.json_response({"streams": await self.listing()})

    async def stream(self, request: web.Request) -> web.Response:
        wanted = (request.match_info["app"], request.match_info["stream"])
        for entry in await self.listing():
            if (entry["app"], entry["stream"]) == wanted:
                return web.json_response(entry)
        return problem(404, "Not Found", f"nobody is publishing {wanted[0]}/{wanted[1]}")

    # Which server ---------------------------------------------------------------------------------------

    async def _nodes(self) -> ListNodesReply:
        reply: ListNodesReply = await self.dispatch.ListNodes(ListNodesRequest(), timeout=TIMEOUT)
        return reply

    async def _choose(self, app: str, name: str, protocol: str, query: dict[str, str],
                      secure: bool = False) -> dict[str, Any]:
        if protocol not in PROTOCOLS:
            raise web.HTTPBadRequest(text=f"protocol is one of {', '.join(PROTOCOLS)}")
        refused = self.signer.refuse(app, name, query)
        if refused:
            raise web.HTTPForbidden(text=refused)
        key = stream_key(app, name)
        listed = await self.dispatch.ListStreams(ListStreamsRequest(), timeout=TIMEOUT)
        if not any(stream_path(s.stream) == stream_path(key) for s in listed.streams):
            raise web.HTTPNotFound(text=f"nobody is publishing {app}/{name}")
        entries = [e for e in (await self._nodes()).nodes if e.node.role == NODE_ROLE_PLAYBACK]
        if protocol in ("rtmp", "srt"):  # ports a playback node may not have
            entries = [e for e in entries if e.node.meta.get(protocol)]
        if not entries:
            raise web.HTTPServiceUnavailable(text=f"no live playback node serves {protocol}")
        if secure:  # a caller on HTTPS (a page there cannot load http:// media): nodes with TLS first
            tls = "rtmps" if protocol == "rtmp" else "https"
            entries = [e for e in entries if e.node.meta.get(tls)] or entries
        now = time.monotonic()
        loads = {}
        for e in entries:
            recent = self.sent[e.node.id]
            while recent and now - recent[0] > RECENT:
                recent.popleft()
            loads[e.node.id] = e.load.subscribers + len(recent)
        ring = BoundedRing([e.node.id for e in entries], epsilon=self.epsilon)
        chosen = ring.pick(stream_path(key), loads)
        node = next(e.node for e in entries if e.node.id == chosen)
        self.sent[node.id].append(now)
        ANSWERS.labels(protocol).inc()
        return {"url": url_for(node, app, name, protocol, query, secure), "node": node.id, "protocol": protocol}

    async def play(self, request: web.Request) -> web.Response:
        query = {k: v for k, v in request.query.items() if k != "protocol"}
        answer = await self._choose(request.match_info["app"], request.match_info["stream"],
                                    request.query.get("protocol", "flv"), query, secure(request))
        return web.json_response(answer)

    async def redirect(self, request: web.Request) -> web.Response:
        name, _, extension = request.match_info["file"].rpartition(".")
        protocols = {"flv": "flv", "m3u8": "hls"}
        if name and extension == "jpg":  # thumbnails: the worker that makes this stream's
            worker = pick_worker([e.node for e in (await self._nodes()).nodes if e.node.role == NODE_ROLE_WORKER],
                                 request.match_info["app"], name)
            if worker is None:
                return problem(503, "Service Unavailable", "no worker makes thumbnails")
            query = f"?{request.query_string}" if request.query_string else ""
            raise web.HTTPFound(worker_url(worker, request.match_info["app"], name) + query)
        if not name or extension not in protocols:
            return problem(404, "Not Found", "streams are at /{app}/{stream}.flv, .m3u8 or .jpg")
        answer = await self._choose(request.match_info["app"], name, protocols[extension], dict(request.query),
                                    secure(request))
        raise web.HTTPFound(answer["url"])

    async def publish(self, request: web.Request) -> web.Response:
        app, name = request.match_info["app"], request.match_info["stream"]
        ingests = [e for e in (await self._nodes()).nodes if e.node.role == NODE_ROLE_INGEST]
        if not ingests:
            return problem(503, "Service Unavailable", "no live ingest node")
        if request.query.get("protocol") == "srt":
            ingests = [e for e in ingests if e.node.meta.get("srt")]
            if not ingests:
                return problem(404, "Not Found", "no live ingest node takes SRT (ingest --srt-port)")
            best = min(ingests, key=lambda e: (e.load.streams, e.node.id)).node
            return web.json_response({"url": srt_url(best, best.meta["srt"], app, name, "publish", {}),
                                      "node": best.id, "protocol": "srt"})
        tls = secure(request)
        if tls:  # a caller on TLS is sent to RTMPS where an ingest has it
            ingests = [e for e in ingests if e.node.meta.get("rtmps")] or ingests
        best = min(ingests, key=lambda e: (e.load.streams, e.node.id)).node
        host = best.address.rpartition(":")[0]
        if tls and best.meta.get("rtmps"):
            return web.json_response({"url": f"rtmps://{host}:{best.meta['rtmps']}/{app}/{name}", "node": best.id,
                                      "protocol": "rtmps"})
        return web.json_response({"url": f"rtmp://{host}:{best.meta.get('rtmp', '1935')}/{app}/{name}",
                                  "node": best.id, "protocol": "rtmp"})

    # Jobs -----------------------------------------------------------------------------------------------

    async def jobs(self, request: web.Request) -> web.Response:
        reply = await self.dispatch.ListJobs(ListJobsRequest(), timeout=TIMEOUT)
        return web.json_response({"jobs": [job_json(j) for j in reply.jobs]})

    async def start_ladder(self, request: web.Request) -> web.Response:
        try:
            body = await request.json() if request.can_read_body else None
            renditions = parse_ladder(body["ladder"]) if isinstance(body, dict) and isinstance(
                body.get("ladder"), str) else None
        except (ValueError, UnicodeDecodeError) as exc:
            return problem(400, "Bad Request", f"the body is not a ladder: {exc}")
        if renditions is None:
            return problem(400, "Bad Request", 'the body is {"ladder": "NAME:SIZE:KBPS[:FPS],..."}')
        return await self._start_job(request, JobSpec(kind=ABR, renditions=renditions))

    async def start_recording(self, request: web.Request) -> web.Response:
        try:
            body = await request.json() if request.can_read_body else {}
        except (ValueError, UnicodeDecodeError) as exc:
            return problem(400, "Bad Request", f"the body is not JSON: {exc}")
        seconds = body.get("segment_seconds", 0) if isinstance(body, dict) else None
        if not isinstance(seconds, int) or isinstance(seconds, bool) or not 0 <= seconds <= SEGMENT_SECONDS[1]:
            return problem(400, "Bad Request", 'the body is {} or {"segment_seconds": N}, N from 1 to '
                                               f'{SEGMENT_SECONDS[1]} (0: the worker\'s own)')
        return await self._start_job(request, JobSpec(kind=RECORD, segment_seconds=seconds))

    async def start_forward(self, request: web.Request) -> web.Response:
        try:
            body = await request.json() if request.can_read_body else None
        except (ValueError, UnicodeDecodeError) as exc:
            return problem(400, "Bad Request", f"the body is not JSON: {exc}")
        targets = body.get("targets") if isinstance(body, dict) else None
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            return problem(400, "Bad Request", 'the body is {"targets": ["rtmp://HOST/APP/KEY", ...]}')
        return await self._start_job(request, JobSpec(kind=FORWARD, targets=targets))

    async def start_pull(self, request: web.Request) -> web.Response:
        try:
            body = await request.json() if request.can_read_body else None
        except (ValueError, UnicodeDecodeError) as exc:
            return problem(400, "Bad Request", f"the body is not JSON: {exc}")
        shape = '{"url": "rtsp://...", "on_demand": false, "idle_seconds": 10}'
        if not isinstance(body, dict) or not isinstance(body.get("url"), str):
            return problem(400, "Bad Request", f"the body is {shape}")
        on_demand, idle = body.get("on_demand", False), body.get("idle_seconds", 0)
        if not isinstance(on_demand, bool) or not isinstance(idle, int) or isinstance(idle, bool) \
                or not 0 <= idle <= IDLE_SECONDS[1]:
            return problem(400, "Bad Request", f"the body is {shape}, idle_seconds at most {IDLE_SECONDS[1]}")
        return await self._start_job(request, JobSpec(kind=PULL, url=body["url"], on_demand=on_demand,
                                                      idle_seconds=idle))

    async def stop_pull(self, request: web.Request) -> web.Response:
        return await self._stop_job(request, PULL)

    async def stop_ladder(self, request: web.Request) -> web.Response:
        return await self._stop_job(request, ABR)

    async def stop_recording(self, request: web.Request) -> web.Response:
        return await self._stop_job(request, RECORD)

    async def stop_forward(self, request: web.Request) -> web.Response:
        return await self._stop_job(request, FORWARD)

    async def _start_job(self, request: web.Request, spec: JobSpec) -> web.Response:
        self._authorize(request)
        app, name = request.match_info["app"], request.match_info["stream"]
        spec.stream.CopyFrom(stream_key(app, name))
        spec.source = "api"
        reply = await self.dispatch.StartJob(spec, timeout=TIMEOUT)
        if not reply.ok:
            status = 404 if "not being published" in reply.detail else 400
            return problem(status, "Not Found" if status == 404 else "Bad Request", reply.detail)
        event(log, "gateway.job_started", job=reply.job.id, detail=reply.detail)
        return web.json_response({"job": job_json(reply.job), "detail": reply.detail},
                                 status=201 if reply.detail.startswith("added") else 200)

    async def _stop_job(self, request: web.Request, kind: str) -> web.Response:
        self._authorize(request)
        app, name = request.match_info["app"], request.match_info["stream"]
        reply = await self.dispatch.StopJob(JobSpec(kind=kind, stream=stream_key(app, name)), timeout=TIMEOUT)
        if not reply.ok:
            return problem(404, "Not Found", reply.detail)
        event(log, "gateway.job_stopped", job=f"{kind}:{app}/{name}")
        return web.json_response({"stopped": True})

    # Recordings -----------------------------------------------------------------------------------------

    async def recorded_streams(self, request: web.Request) -> web.Response:
        return web.json_response({"streams": await self.recordings.streams()})

    async def recorded(self, request: web.Request) -> web.Response:
        """A stream's recordings: the spans they cover (files that follow each other make one), each file,
        and where a playback node serves them as HLS VOD and as one MP4."""
        app, name = request.match_info["app"], request.match_info["stream"]
        try:
            start, end = recording_span(dict(request.query))
        except SpanError as exc:
            return problem(400, "Bad Request", str(exc))
        pieces = overlapping(await self.recordings.files(app, name), start, end)
        if not pieces:
            return problem(404, "Not Found", f"no recordings of {app}/{name}" + (" in that span" if start or end
                                                                                 else ""))
        listed: list[dict[str, Any]] = [{"start": a, "end": b} for a, b in spans(pieces)]
        playback = [e for e in (await self._nodes()).nodes if e.node.role == NODE_ROLE_PLAYBACK]
        node = min(playback, key=lambda e: (e.load.subscribers, e.node.id)).node if playback else None
        for item in listed:
            item["duration"] = round(item["end"] - item["start"], 3)
            item["start_time"], item["end_time"] = iso_time(item["start"]), iso_time(item["end"])
            if node is not None:
                query = {"start": f"{item['start']:.3f}", "end": f"{item['end']:.3f}"}
                query.update({k: request.query[k] for k in ("expires", "sign") if k in request.query})
                item["playlist"] = recording_url(node, app, name, "m3u8", query, secure(request))
                item["download"] = recording_url(node, app, name, "mp4", query, secure(request))
        return web.json_response({"app": app, "stream": name, "spans": listed,
                                  "files": [p.json(fragments=False) for p in pieces]})

    # Kicks ----------------------------------------------------------------------------------------------

    def _authorize(self, request: web.Request) -> None:
        if self.admin_token and not hmac.compare_digest(request.headers.get("Authorization", ""),
                                                        f"Bearer {self.admin_token}"):
            raise web.HTTPUnauthorized(text="admin calls need Authorization: Bearer <admin token>",
                                       headers={"WWW-Authenticate": "Bearer"})

    async def _kick(self, node: Node, kick: KickRequest) -> int:
        port = node.meta.get("grpc")
        if not port:
            raise web.HTTPServiceUnavailable(text=f"node {node.id} has no admin port")
        address = f"{node.address.rpartition(':')[0]}:{port}"
        try:
            reply = await AdminStub(self.admin_channels.get(address)).Kick(kick, timeout=TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self.admin_channels.forget(address)
            raise
        kicked: int = reply.kicked
        return kicked

    async def kick_publisher(self, request: web.Request) -> web.Response:
        self._authorize(request)
        app, name = request.match_info["app"], request.match_info["stream"]
        key = stream_key(app, name)
        listed = await self.dispatch.ListStreams(ListStreamsRequest(), timeout=TIMEOUT)
        info = next((s for s in listed.streams if stream_path(s.stream) == stream_path(key)), None)
        if info is None:
            raise web.HTTPNotFound(text=f"nobody is publishing {app}/{name}")
        ingest_id = info.holder.split("/", 1)[0]
        node = next((e.node for e in (await self._nodes()).nodes if e.node.id == ingest_id), None)
        if node is None:
            raise web.HTTPServiceUnavailable(text=f"the ingest holding {app}/{name} ({ingest_id}) is not listed")
        kicked = await self._kick(node, KickRequest(stream=key, reason=request.query.get("reason", "")))
        event(log, "gateway.kick", stream=f"{app}/{name}", node=node.id, kicked=kicked)
        return web.json_response({"kicked": kicked, "node": node.id})

    async def kick_client(self, request: web.Request) -> web.Response:
        self._authorize(request)
        client_id = request.match_info["id"]
        node_id = client_id.rpartition(".")[0]
        node = next((e.node for e in (await self._nodes()).nodes if e.node.id == node_id), None)
        kicked = await self._kick(node, KickRequest(client_id=client_id, reason=request.query.get("reason", ""))) \
            if node is not None else 0
        if not kicked:
            raise web.HTTPNotFound(text=f"no viewer {client_id}")
        return web.json_response({"kicked": kicked, "node": node_id})

    # Nodes and health -----------------------------------------------------------------------------------

    async def nodes(self, request: web.Request) -> web.Response:
        return web.json_response({"nodes": [
            {"id": e.node.id, "role": NodeRole.Name(e.node.role).removeprefix("NODE_ROLE_").lower(),
             "address": e.node.address, "zone": e.node.zone, "meta": dict(e.node.meta), "health": "passing",
             "load": {"streams": e.load.streams, "subscribers": e.load.subscribers, "cpu": e.load.cpu}}
            for e in (await self._nodes()).nodes]})

    async def healthz(self, request: web.Request) -> web.Response:
        try:
            await self._nodes()
        except grpc.aio.AioRpcError as exc:
            return problem(503, "Service Unavailable", f"dispatch did not answer: {exc.code().name}")
        return web.json_response({"status": "ok"})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(DOCUMENT)

    async def docs(self, request: web.Request) -> web.Response:
        return web.Response(text=docs_page(), content_type="text/html")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def job_json(job: Job) -> dict[str, Any]:
    spec = job.spec
    out: dict[str, Any] = {
        "id": job.id, "kind": spec.kind, "app": spec.stream.app, "stream": spec.stream.name, "source": spec.source,
        "worker": job.worker, "state": Job.State.Name(job.state).removeprefix("STATE_").lower(),
        "detail": job.detail, "outputs": list(job.outputs), "since_us": job.since_us}
    if spec.kind == ABR:
        out["ladder"] = ladder_text(list(spec.renditions))
        out["renditions"] = [{"name": r.name, "width": r.width, "height": r.height, "bitrate_kbps": r.bitrate_kbps,
                              "frame_rate": r.frame_rate, "codec": r.codec} for r in spec.renditions]
    elif spec.kind == RECORD:
        out["segment_seconds"] = spec.segment_seconds
    elif spec.kind == PULL:
        out.update(url=masked(spec.url), on_demand=spec.on_demand, idle_seconds=spec.idle_seconds)
    elif spec.kind == FORWARD:  # a URL's stream key and password are secrets: never shown
        states = {t.url: t for t in job.targets}
        out["targets"] = [{"url": masked(url), **({
            "state": ForwardTarget.State.Name(t.state).removeprefix("STATE_").lower(), "detail": t.detail,
            "bytes": t.bytes, "connects": t.connects, "since_us": t.since_us} if (t := states.get(url)) else {})}
            for url in spec.targets]
    return out


def iso_time(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def recording_url(node: Node, app: str, name: str, extension: str, query: dict[str, str], secure: bool) -> str:
    """Where a playback node serves a stream's recordings (services.playback.recordings)."""
    tls = secure and bool(node.meta.get("https"))
    address = f"{node.address.rpartition(':')[0]}:{node.meta['https']}" if tls else node.address
    return f"{'https' if tls else 'http'}://{address}/recordings/{app}/{name}.{extension}?{urlencode(query)}"


def secure(request: web.Request) -> bool:
    """Whether the caller came over TLS: to this server, or to the HTTPS port in front of it (Forwarder)."""
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"


def srt_url(node: Node, port: str, app: str, name: str, mode: str, query: dict[str, str]) -> str:
    """An srt:// URL whose stream id (percent-encoded, as players need it) names the stream, the mode and a
    signed URL's keys (castmesh.srt.streamid)."""
    keys = "".join(f",{key}={value}" for key, value in query.items())
    stream_id = quote(f"#!::r={app}/{name},m={mode}{keys}", safe="")
    return f"srt://{node.address.rpartition(':')[0]}:{port}?streamid={stream_id}"


def url_for(node: Node, app: str, name: str, protocol: str, query: dict[str, str], secure: bool = False) -> str:
    """Where `node` serves the stream over `protocol`; over TLS when the caller is on TLS and the node has
    a TLS port for it (meta "https", "rtmps")."""
    host = node.address.rpartition(":")[0]
    suffix = f"?{urlencode(query)}" if query else ""
    if protocol == "srt":
        return srt_url(node, node.meta["srt"], app, name, "request", query)
    if protocol == "rtmp":
        if secure and node.meta.get("rtmps"):
            return f"rtmps://{host}:{node.meta['rtmps']}/{app}/{name}{suffix}"
        return f"rtmp://{host}:{node.meta['rtmp']}/{app}/{name}{suffix}"
    tls = secure and bool(node.meta.get("https"))
    address = f"{host}:{node.meta['https']}" if tls else node.address
    if protocol == "webrtc":
        return f"{'https' if tls else 'http'}://{address}/{app}/{name}/whep{suffix}"  # a WHEP player POSTs there
    scheme = ("wss" if tls else "ws") if protocol == "ws" else ("https" if tls else "http")
    extension = "m3u8" if protocol == "hls" else "flv"
    return f"{scheme}://{address}/{app}/{name}.{extension}{suffix}"
