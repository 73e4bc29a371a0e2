"""Placement: which origin takes a new publish, which edge serves a stream for a zone.

Origins are chosen by load (fewest streams, then fewest subscribers). Edges are chosen by rendezvous
hashing of the stream over the zone's live edges, so every playback node of a zone pulls a given stream
from the same edge (one back-to-source per stream per zone), and only the streams of an edge that dies
move elsewhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from castmesh.proto.v1.dispatch_pb2 import NODE_ROLE_EDGE, NODE_ROLE_ORIGIN, Node, NodeLoad


def pick_origin(nodes: Iterable[tuple[Node, NodeLoad]], avoid: set[str], prefer: str | None = None) -> Node | None:
    candidates = [(n, load) for n, load in nodes if n.role == NODE_ROLE_ORIGIN and n.address not in avoid]
    if prefer:
        for node, _ in candidates:
            if node.address == prefer:
                return node
    if not candidates:
        return None
    return min(candidates, key=lambda c: (c[1].streams, c[1].subscribers, c[0].id))[0]


def pick_edge(nodes: Iterable[tuple[Node, NodeLoad]], zone: str, stream: str, avoid: set[str]) -> Node | None:
    edges = [n for n, _ in nodes if n.role == NODE_ROLE_EDGE and n.zone == zone and n.address not in avoid]
    if not edges:
        return None
    return max(edges, key=lambda n: hashlib.blake2b(f"{stream}|{n.id}".encode(), digest_size=8).digest())
