"""The gateway's OpenAPI 3.1 document (served at /openapi.json) and a docs page rendered from it (/docs),
with no script from anywhere: the page is plain HTML."""

from __future__ import annotations

import html
from typing import Any

NAME = {"type": "string", "pattern": "^[A-Za-z0-9_.~-]{1,256}$"}
PROBLEM = {"description": "A problem (RFC 9457)",
           "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}


def _path_params(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "in": "path", "required": True, "schema": NAME} for n in names]


def _json(schema_ref: str, description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_ref}"}}}}


PLAY_QUERY = [{"name": "protocol", "in": "query", "required": False,
               "schema": {"type": "string", "enum": ["flv", "hls", "rtmp", "ws", "webrtc", "srt"], "default": "flv"}},
              {"name": "expires", "in": "query", "required": False, "schema": {"type": "string"},
               "description": "signed URLs: UNIX time the signature is valid until"},
              {"name": "sign", "in": "query", "required": False, "schema": {"type": "string"},
               "description": "signed URLs: hex HMAC-SHA256(secret, /{app}/{stream} + expires)"}]

STOPPED = {"description": "Stopped", "content": {"application/json": {
    "schema": {"type": "object", "properties": {"stopped": {"type": "boolean"}}}}}}
SPAN_QUERY = [{"name": "start", "in": "query", "required": False, "schema": {"type": "string"},
               "description": "seconds since the epoch, or an ISO 8601 time"},
              {"name": "end", "in": "query", "required": False, "schema": {"type": "string"}},
              {"name": "duration", "in": "query", "required": False, "schema": {"type": "number"},
               "description": "seconds from start, instead of end"}]
SPAN = {"type": "object", "properties": {
    "start": {"type": "number"}, "end": {"type": "number"}, "duration": {"type": "number"},
    "start_time": {"type": "string"}, "end_time": {"type": "string"},
    "playlist": {"type": "string", "description": "HLS VOD (EXT-X-PLAYLIST-TYPE:VOD) on a playback node"},
    "download": {"type": "string", "description": "one MP4 of the span, on a playback node"}}}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "castmesh gateway", "version": "1.0.0",
             "description": "Which server for stream X, redirects to playback nodes, listings of streams and "
                            "nodes. Errors are problem details (RFC 9457)."},
    "paths": {
        "/api/v1/streams": {"get": {
            "summary": "Live streams: publisher, codecs, resolution, bitrate, viewers and playback nodes "
                       "(at most a second old)",
            "operationId": "listStreams",
            "responses": {"200": _json("StreamList", "The live streams"), "503": PROBLEM}}},
        "/api/v1/streams/{app}/{stream}": {"get": {
            "summary": "One live stream", "operationId": "getStream", "parameters": _path_params("app", "stream"),
            "responses": {"200": _json("Stream", "The stream"), "404": PROBLEM, "503": PROBLEM}},
            "delete": {"summary": "Kick the publisher: its stream ends for every viewer",
                       "operationId": "kickPublisher",
                       "parameters": _path_params("app", "stream"), "security": [{"bearer": []}],
                       "responses": {"200": _json("Kicked", "Kicked"), "401": PROBLEM, "404": PROBLEM,
                                     "503": PROBLEM}}},
        "/api/v1/clients/{id}": {"delete": {
            "summary": "Kick one viewer (its id is in the stream's clients)", "operationId": "kickClient",
            "parameters": [{"name": "id", "in": "path", "required": True,
                            "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,200}$"}}],
            "security": [{"bearer": []}],
            "responses": {"200": _json("Kicked", "Kicked"), "401": PROBLEM, "404": PROBLEM, "503": PROBLEM}}},
        "/api/v1/streams/{app}/{stream}/play": {"get": {
            "summary": "Which server for stream X: a ready-to-use URL on a live playback node",
            "operationId": "play", "parameters": [*_path_params("app", "stream"), *PLAY_QUERY],
            "responses": {"200": _json("Placement", "Where to play"), "400": PROBLEM, "403": PROBLEM,
                          "404": PROBLEM, "503": PROBLEM}}},
        "/api/v1/publish/{app}/{stream}": {"get": {
            "summary": "The RTMP URL of the ingest node a publisher should use (RTMPS for a caller on HTTPS, "
                       "where the ingest has it; SRT with ?protocol=srt)", "operationId": "publish",
            "parameters": [*_path_params("app", "stream"), {"name": "protocol", "in": "query", "required": False,
                           "schema": {"type": "string", "enum": ["rtmp", "srt"], "default": "rtmp"}}],
            "responses": {"200": _json("Placement", "Where to publish"), "404": PROBLEM, "503": PROBLEM}}},
        "/api/v1/jobs": {"get": {
            "summary": "Jobs (ABR ladders, recordings, forwards): source, settings, the worker running each, state",
            "operationId": "listJobs", "responses": {"200": _json("JobList", "The jobs"), "503": PROBLEM}}},
        "/api/v1/streams/{app}/{stream}/abr": {
            "post": {"summary": "Start an ABR ladder for a live stream (renditions {stream}_{name}); it ends with "
                                "the stream", "operationId": "startLadder", "parameters": _path_params("app", "stream"),
                     "security": [{"bearer": []}],
                     "requestBody": {"required": True, "content": {"application/json": {"schema": {
                         "type": "object", "required": ["ladder"], "properties": {"ladder": {
                             "type": "string", "description": "NAME:SIZE:KBPS[:FPS] renditions separated by ',', "
                                                              "e.g. 360p:x360:800k,180p:x180:300k:15"}}}}}},
                     "responses": {"200": _json("JobStarted", "Running already"),
                                   "201": _json("JobStarted", "Started"), "400": PROBLEM, "401": PROBLEM,
                                   "404": PROBLEM, "503": PROBLEM}},
            "delete": {"summary": "Stop a stream's ABR ladder", "operationId": "stopLadder",
                       "parameters": _path_params("app", "stream"), "security": [{"bearer": []}],
                       "responses": {"200": STOPPED, "401": PROBLEM, "404": PROBLEM, "503": PROBLEM}}},
        "/api/v1/streams/{app}/{stream}/record": {
            "post": {"summary": "Record a live stream (fMP4 files on a worker); it ends with the stream",
                     "operationId": "startRecording", "parameters": _path_params("app", "stream"),
                     "security": [{"bearer": []}],
                     "requestBody": {"required": False, "content": {"application/json": {"schema": {
                         "type": "object", "properties": {"segment_seconds": {
                             "type": "integer", "minimum": 0, "maximum": 86400,
                             "description": "how long each file lasts (0: the worker's --record-segment)"}}}}}},
                     "responses": {"200": _json("JobStarted", "Recording already"),
                                   "201": _json("JobStarted", "Started"), "400": PROBLEM, "401": PROBLEM,
                                   "404": PROBLEM, "503": PROBLEM}},
            "delete": {"summary": "Stop recording a stream", "operationId": "stopRecording",
                       "parameters": _path_params("app", "stream"), "security": [{"bearer": []}],
                       "responses": {"200": STOPPED, "401": PROBLEM, "404": PROBLEM, "503": PROBLEM}}},
        "/api/v1/streams/{app}/{stream}/forward": {
            "post": {"summary": "Push a live stream on to RTMP, RTMPS or SRT URLs, reconnecting with backoff; it "
                                "ends with the stream", "operationId": "startForward",
                     "parameters": _path_params("app", "stream"), "security": [{"bearer": []}],
                     "requestBody": {"required": True, "content": {"application/json": {"schema": {
                         "type": "object", "required": ["targets"], "properties": {"targets": {
                             "type": "array", "minItems": 1, "maxItems": 8, "items": {"type": "string"},
                             "description": "rtmp://HOST[:PORT]/APP/KEY, rtmps://..., srt://HOST:PORT?streamid=..."}}}}}},
                     "responses": {"200": _json("JobStarted", "Forwarding already"),
                                   "201": _json("JobStarted", "Started"), "400": PROBLEM, "401": PROBLEM,
                                   "404": PROBLEM, "503": PROBLEM}},
            "delete": {"summary": "Stop forwarding a stream", "operationId": "stopForward",
                       "parameters": _path_params("app", "stream"), "security": [{"bearer": []}],
                       "responses": {"200": STOPPED, "401": PROBLEM, "404": PROBLEM, "503": PROBLEM}}},
        "/api/v1/streams/{app}/{stream}/pull": {
            "post": {"summary": "Make a stream from a URL (RTSP, RTMP, an HLS playlist, SRT), pulled always, or on "
                                "demand: started by its first viewer, ended idle_seconds after the last",
                     "operationId": "startPull", "parameters": _path_params("app", "stream"),
                     "security": [{"bearer": []}],
                     "requestBody": {"required": True, "content": {"application/json": {"schema": {
                         "type": "object", "required": ["url"], "properties": {
                             "url": {"type": "string", "description": "rtsp://, rtmp://, http(s)://...m3u8, srt://"},
                             "on_demand": {"type": "boolean", "default": False},
                             "idle_seconds": {"type": "integer", "minimum": 0, "maximum": 3600,
                                              "description": "on demand: 0 for 10"}}}}}},
                     "responses": {"200": _json("JobStarted", "Pulled already"),
                                   "201": _json("JobStarted", "Started (or, on demand, waiting for a viewer)"),
                                   "400": PROBLEM, "401": PROBLEM, "503": PROBLEM}},
            "delete": {"summary": "Stop pulling a stream", "operationId": "stopPull",
                       "parameters": _path_params("app", "stream"), "security": [{"bearer": []}],
                       "responses": {"200": STOPPED, "401": PROBLEM, "404": PROBLEM, "503": PROBLEM}}},
        "/api/v1/recordings": {"get": {
            "summary": "Streams with recordings on any worker: files and bytes", "operationId": "listRecordedStreams",
            "responses": {"200": _json("RecordedStreams", "The recorded streams")}}},
        "/api/v1/recordings/{app}/{stream}": {"get": {
            "summary": "A stream's recordings: the spans they cover, with a playback node's HLS VOD playlist and "
                       "MP4 download of each, and every file", "operationId": "listRecordings",
            "parameters": [*_path_params("app", "stream"), *SPAN_QUERY],
            "responses": {"200": _json("Recordings", "The recordings"), "400": PROBLEM, "404": PROBLEM,
                          "503": PROBLEM}}},
        "/api/v1/nodes": {"get": {
            "summary": "Every registered node with role, zone, health and load", "operationId": "listNodes",
            "responses": {"200": _json("NodeList", "The nodes"), "503": PROBLEM}}},
        "/{app}/{file}": {"get": {
            "summary": "A 302 to the chosen playback node for {stream}.flv (HTTP-FLV) or {stream}.m3u8 (HLS), or "
                       "to the worker that makes {stream}.jpg (the latest keyframe as a JPEG)",
            "operationId": "redirect", "parameters": _path_params("app", "file"),
            "responses": {"302": {"description": "Redirect to a playback node", "headers": {
                "Location": {"schema": {"type": "string"}}}}, "403": PROBLEM, "404": PROBLEM, "503": PROBLEM}}},
        "/healthz": {"get": {"summary": "The gateway and its dispatch answer", "operationId": "healthz",
                             "responses": {"200": {"description": "Healthy", "content": {"application/json": {
                                 "schema": {"type": "object", "properties": {"status": {"type": "string"}}}}}},
                                 "503": PROBLEM}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "operationId": "metrics",
                             "responses": {"200": {"description": "Metrics in the Prometheus text format",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    },
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}, "schemas": {
        "Problem": {"type": "object", "required": ["type", "title", "status"], "properties": {
            "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
            "detail": {"type": "string"}}},
        "Placement": {"type": "object", "required": ["url", "node", "protocol"], "properties": {
            "url": {"type": "string"}, "node": {"type": "string"},
            "protocol": {"type": "string", "enum": ["flv", "hls", "rtmp", "rtmps", "ws", "webrtc", "srt"]}}},
        "Stream": {"type": "object", "required": ["app", "stream", "publisher", "viewers", "nodes"], "properties": {
            "app": {"type": "string"}, "stream": {"type": "string"}, "vhost": {"type": "string"},
            "publisher": {"type": "object", "properties": {"holder": {"type": "string"},
                                                           "client_addr": {"type": "string"}}},
            "origin": {"type": "string"}, "since_us": {"type": "integer"}, "publishing": {"type": "boolean"},
            "video": {"type": "string"}, "audio": {"type": "string"}, "width": {"type": "integer"},
            "height": {"type": "integer"}, "fps": {"type": "number"}, "bitrate_kbps": {"type": "integer"},
            "viewers": {"type": "integer"}, "nodes": {"type": "array", "items": {"type": "string"}},
            "renditions": {"type": "array", "items": {"type": "string"},
                           "description": "the streams its ABR ladder publishes"},
            "rendition_of": {"type": "string", "description": "the source, for a rendition"},
            "clients": {"type": "array", "items": {"type": "object", "properties": {
                "id": {"type": "string"}, "node": {"type": "string"}, "protocol": {"type": "string"},
                "peer": {"type": "string"}}}}}},
        "Kicked": {"type": "object", "required": ["kicked", "node"], "properties": {
            "kicked": {"type": "integer"}, "node": {"type": "string"}}},
        "StreamList": {"type": "object", "required": ["streams"], "properties": {
            "streams": {"type": "array", "items": {"$ref": "#/components/schemas/Stream"}}}},
        "Node": {"type": "object", "required": ["id", "role", "address"], "properties": {
            "id": {"type": "string"}, "role": {"type": "string"}, "address": {"type": "string"},
            "zone": {"type": "string"}, "health": {"type": "string"},
            "meta": {"type": "object", "additionalProperties": {"type": "string"}},
            "load": {"type": "object", "properties": {"streams": {"type": "integer"},
                                                      "subscribers": {"type": "integer"},
                                                      "cpu": {"type": "number"}}}}},
        "Job": {"type": "object", "required": ["id", "kind", "app", "stream", "state"], "properties": {
            "id": {"type": "string"}, "kind": {"type": "string"}, "app": {"type": "string"},
            "stream": {"type": "string"}, "source": {"type": "string"}, "ladder": {"type": "string"},
            "segment_seconds": {"type": "integer"}, "url": {"type": "string"}, "on_demand": {"type": "boolean"},
            "idle_seconds": {"type": "integer"},
            "targets": {"type": "array", "items": {"type": "object", "properties": {
                "url": {"type": "string", "description": "with its stream key and password masked"},
                "state": {"type": "string", "enum": ["unspecified", "connecting", "forwarding", "retrying"]},
                "detail": {"type": "string"}, "bytes": {"type": "integer"}, "connects": {"type": "integer"},
                "since_us": {"type": "integer"}}}},
            "renditions": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}, "width": {"type": "integer"}, "height": {"type": "integer"},
                "bitrate_kbps": {"type": "integer"}, "frame_rate": {"type": "number"}, "codec": {"type": "string"}}}},
            "worker": {"type": "string"},
            "state": {"type": "string", "enum": ["unspecified", "pending", "starting", "running", "failed", "waiting",
                                                   "done"]},
            "detail": {"type": "string"}, "outputs": {"type": "array", "items": {"type": "string"}},
            "since_us": {"type": "integer"}}},
        "RecordedStreams": {"type": "object", "required": ["streams"], "properties": {"streams": {
            "type": "array", "items": {"type": "object", "properties": {
                "app": {"type": "string"}, "stream": {"type": "string"}, "files": {"type": "integer"},
                "bytes": {"type": "integer"}}}}}},
        "Recordings": {"type": "object", "required": ["spans", "files"], "properties": {
            "app": {"type": "string"}, "stream": {"type": "string"},
            "spans": {"type": "array", "items": SPAN},
            "files": {"type": "array", "items": {"type": "object", "properties": {
                "worker": {"type": "string"}, "file": {"type": "string"}, "start": {"type": "number"},
                "duration": {"type": "number"}, "bytes": {"type": "integer"}, "init": {"type": "integer"},
                "writing": {"type": "boolean"}}}}}},
        "JobList": {"type": "object", "required": ["jobs"], "properties": {
            "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}}}},
        "JobStarted": {"type": "object", "required": ["job"], "properties": {
            "job": {"$ref": "#/components/schemas/Job"}, "detail": {"type": "string"}}},
        "NodeList": {"type": "object", "required": ["nodes"], "properties": {
            "nodes": {"type": "array", "items": {"$ref": "#/components/schemas/Node"}}}},
    }},
}


def docs_page(document: dict[str, Any] = DOCUMENT) -> str:
    rows = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            params = ", ".join(f"{p['name']} ({p['in']})" for p in operation.get("parameters", []))
            codes = ", ".join(operation["responses"])
            rows.append(f"<tr><td><code>{method.upper()} {html.escape(path)}</code></td>"
                        f"<td>{html.escape(operation['summary'])}</td><td>{html.escape(params)}</td>"
                        f"<td>{codes}</td></tr>")
    info = document["info"]
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(info['title'])}"
            "</title><style>body{font-family:system-ui,sans-serif;margin:2rem}td,th{padding:.3rem .6rem;"
            "border-bottom:1px solid #ddd;text-align:left}</style></head><body>"
            f"<h1>{html.escape(info['title'])} {html.escape(info['version'])}</h1>"
            f"<p>{html.escape(info['description'])} The machine-readable document is "
            "<a href=\"/openapi.json\">/openapi.json</a>.</p><table><tr><th>Operation</th><th>What</th>"
            f"<th>Parameters</th><th>Answers</th></tr>{''.join(rows)}</table></body></html>")
