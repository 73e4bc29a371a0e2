"""One viewer on a playback node, whatever carries it: who it is, where its media goes (a sink: an HTTP-FLV
or WebSocket-FLV session, an RTMP play, an HLS muxer), the stream feed it watches, how far behind its
output is, its session span and counters. One record per viewer; the server finds it by client id, the
feed by itself, the sink by its `viewer` attribute.

A sink is the protocol's adapter: its format (services.playback.formats) makes what it takes once per
flush for every sink of that format, and it knows how to start, refuse and finish a play in its
protocol's words. An HLS muxer is one viewer however many clients fetch its playlist: it stands for
them (`watching`), and its output is memory that never falls behind.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

from castmesh.media.lag import LagPolicy
from castmesh.mesh.tracing import SessionSpan
from services.playback.formats import OutputFormat


class Output(Protocol):
    """Where a sink's media goes: its socket's transport, or the sink itself when it keeps media in memory."""

    def write(self, data: Any) -> None: ...
    def get_write_buffer_size(self) -> int: ...
    def abort(self) -> None: ...


class ViewerSink(Protocol):
    """What a feed needs from a viewer's adapter (an HTTP-FLV session, an RTMP player, an HLS muxer)."""

    viewer: Viewer | None

    @property
    def transport(self) -> Output: ...

    @property
    def format(self) -> OutputFormat: ...

    def start(self, head: Any) -> bool: ...
    def refuse(self, status: int, reason: str) -> None: ...
    def finish(self, reason: str) -> None: ...

    def discontinuity(self) -> None:
        """What follows comes from a new upstream or a new publish session."""

    def watching(self) -> int:
        """The people it stands for: 1 for a connection, an HLS muxer's recent clients."""


class Watched(Protocol):
    """The stream feed a viewer watches (services.playback.feed.StreamFeed)."""

    def remove(self, viewer: Viewer) -> None: ...


class Viewer:
    __slots__ = ("caller", "client_id", "feed", "hook_body", "lag", "marks", "peer", "protocol", "sink", "span",
                 "written")

    def __init__(self, client_id: str, protocol: str, peer: str, sink: ViewerSink, hook_body: dict[str, Any],
                 max_lag: float, caller: dict[str, str] | None = None) -> None:
        self.client_id = client_id
        self.protocol = protocol
        self.peer = peer
        self.sink = sink
        self.hook_body = hook_body  # what the on_play/on_stop hooks are told
        self.caller = caller  # HTTP request headers: a traceparent there parents the span
        self.feed: Watched | None = None  # set once admitted (after the on_play hook, if one is set)
        self.span: SessionSpan | None = None
        self.lag = LagPolicy(max_lag)
        self.written = 0
        self.marks: deque[tuple[float, int]] = deque()  # (when, total bytes written after that write)
        sink.viewer = self

    @property
    def path(self) -> str:
        return f"{self.hook_body['app']}/{self.hook_body['stream']}"

    def behind(self, now: float) -> float:
        """Age of the oldest byte its socket has not handed to the kernel yet (0 when it has drained)."""
        unsent = self.sink.transport.get_write_buffer_size()
        if unsent == 0:
            self.marks.clear()
            return 0.0
        oldest = self.written - unsent
        marks = self.marks
        while len(marks) > 1 and marks[0][1] <= oldest:
            marks.popleft()
        return now - marks[0][0] if marks else 0.0

    def write(self, data: Any, size: int, now: float) -> None:
        self.sink.transport.write(data)
        self.written += size
        if self.sink.transport.get_write_buffer_size():
            self.marks.append((now, self.written))

    def counters(self) -> dict[str, int]:
        """What it has been sent so far (for its session span), read only when asked."""
        return {"bytes": self.written, "skips": self.lag.skips}

    def moment(self, name: str, **attributes: str | int) -> None:
        """A key moment of its session, as an event on its span (if it has one)."""
        if self.span is not None:
            self.span.event(name, **attributes)
