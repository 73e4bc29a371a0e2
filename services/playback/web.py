"""The player page that playback nodes serve at /: the page, its script, and the JS players (mpegts.js,
hls.js) from web/node_modules, installed from the npm lockfile by `make up`, never from a CDN. The stream
list comes from /api/streams: the catalog (what is published, and what it carries) with this node's own
viewer counts."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from castmesh.media.frames import stream_path
from castmesh.mesh.logs import event
from castmesh.proto.v1.relay_pb2 import StreamStats

log = logging.getLogger("castmesh.playback")

# the repository's web/ (make up installs its players there); an image sets CASTMESH_WEB_ROOT
WEB_ROOT = Path(os.environ.get("CASTMESH_WEB_ROOT") or Path(__file__).resolve().parents[2] / "web")
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/player.js": ("player.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    "/vendor/mpegts.js": ("node_modules/mpegts.js/dist/mpegts.js", "text/javascript; charset=utf-8"),
    "/vendor/hls.js": ("node_modules/hls.js/dist/hls.min.js", "text/javascript; charset=utf-8"),
}

ListStreams = Callable[[], Awaitable[list[StreamStats]]]
Viewers = Callable[[str], int]  # stream path -> viewers on this node


class WebPage:
    def __init__(self, root: Path = WEB_ROOT) -> None:
        self.root = root
        self.cache: dict[str, bytes] = {}

    def file(self, path: str) -> tuple[int, bytes, str] | None:
        """(status, body, content type) for one of the page's files, or None if `path` is not one."""
        entry = FILES.get(path)
        if entry is None:
            return None
        name, content_type = entry
        body = self.cache.get(name)
        if body is None:
            try:
                body = self.cache[name] = (self.root / name).read_bytes()
            except OSError:
                missing = f"{self.root / name} is missing: run `make up` (it installs the players with npm ci)\n"
                event(log, "web.missing", level=logging.WARNING, file=str(self.root / name))
                return 503, missing.encode(), "text/plain; charset=utf-8"
        return 200, body, content_type


async def streams_json(list_streams: ListStreams, viewers: Viewers) -> bytes:
    streams = []
    for stats in await list_streams():
        media, key = stats.media, stats.stream
        streams.append({
            "path": f"{key.app}/{key.name}", "app": key.app, "name": key.name, "publishing": stats.publishing,
            "video": media.video_codec, "audio": media.audio_codec, "width": media.width, "height": media.height,
            "fps": media.frame_rate, "bitrate_kbps": media.bitrate_kbps, "since_us": stats.since_us,
            "viewers": viewers(stream_path(key)),
        })
    return json.dumps({"streams": streams}).encode()
