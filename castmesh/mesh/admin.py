"""The Admin gRPC service a node serves next to its health service: the node passes in what a kick means
for it (ingest: end a publish; playback: disconnect a viewer)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from castmesh.mesh.logs import event
from castmesh.proto.v1 import admin_pb2_grpc
from castmesh.proto.v1.admin_pb2 import KickReply, KickRequest

log = logging.getLogger("castmesh.admin")


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, kick: Callable[[KickRequest], int]) -> None:
        self.kick = kick

    async def Kick(self, request: KickRequest, context: grpc.aio.ServicerContext) -> KickReply:
        kicked = self.kick(request)
        event(log, "admin.kick", stream=f"{request.stream.app}/{request.stream.name}" if request.stream.name else "",
              client=request.client_id, kicked=kicked, reason=request.reason)
        return KickReply(kicked=kicked)


def add_admin(server: grpc.aio.Server, kick: Callable[[KickRequest], int]) -> None:
    admin_pb2_grpc.add_AdminServicer_to_server(AdminService(kick), server)
