"""An edge relay's pull: one upstream subscription per stream, shared by all of the edge's subscribers.
The following, re-locating and de-duplicating is castmesh.mesh.subscription's; this only feeds the
edge's RelayStream and releases it when the upstream is gone for good."""

from __future__ import annotations

import asyncio
import logging

from castmesh.mesh.link import RelayLinks
from castmesh.mesh.logs import event
from castmesh.mesh.subscription import Locate, UpstreamSubscription
from castmesh.proto.v1.media_pb2 import Frame, FrameBatch, StreamHeader
from castmesh.proto.v1.relay_pb2 import StreamEnd
from services.relay.fanout import RelayStream, StreamTable

log = logging.getLogger("castmesh.relay")


class UpstreamPull:
    def __init__(self, table: StreamTable, stream: RelayStream, locate: Locate, links: RelayLinks,
                 subscriber_id: str) -> None:
        self.table = table
        self.stream = stream
        self.subscription = UpstreamSubscription(stream.key, locate, links, subscriber_id,
                                                 self._on_header, self._on_frames, span_name="relay.pull")
        self.task = asyncio.get_running_loop().create_task(self._run())

    def _on_header(self, header: StreamHeader, new_timeline: bool) -> None:
        self.stream.new_session(header.session_id, header=header)

    def _on_frames(self, frames: list[Frame]) -> None:
        self.stream.publish(FrameBatch(frames=frames))

    async def _run(self) -> None:
        end = StreamEnd(reason=StreamEnd.REASON_SHUTDOWN, detail="edge stopped pulling")
        try:
            end = await self.subscription.run()
        finally:
            self.table.release(self.stream, end)
            event(log, "pull.stop", stream=self.stream.path, reason=end.detail or StreamEnd.Reason.Name(end.reason),
                  switches=self.subscription.switches, repeats_dropped=self.subscription.continuity.dropped)
