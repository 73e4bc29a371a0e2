"""Which playback node a viewer of a stream should use: consistent hashing with bounded loads (Mirrokni,
Thorup and Zadimoghaddam, 2016), as HAProxy's hash-balance-factor and Vimeo's live edge do it.

Every node owns `points` positions on a hash ring. A stream hashes to a position and walks clockwise;
it takes the first node whose load is under the cap ceil((1 + epsilon) * (total load + 1) / nodes).
So a stream's viewers pack onto the first node of its walk until that node is full, then the next:
few nodes hold a stream's upstream subscription, and no node carries more than (1 + epsilon) times
the average. Adding or removing a node moves only the streams whose walk passes it.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Mapping


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class BoundedRing:
    def __init__(self, nodes: list[str], points: int = 64, epsilon: float = 0.25) -> None:
        if epsilon <= 0:
            raise ValueError("epsilon must be positive")
        self.nodes = sorted(set(nodes))
        self.epsilon = epsilon
        ring = sorted((_hash(f"{node}#{i}"), node) for node in self.nodes for i in range(points))
        self.keys = [k for k, _ in ring]
        self.owners = [n for _, n in ring]

    def cap(self, loads: Mapping[str, int]) -> int:
        total = sum(loads.get(n, 0) for n in self.nodes)
        return math.ceil((1 + self.epsilon) * (total + 1) / len(self.nodes))

    def walk(self, key: str) -> list[str]:
        """The nodes in the order `key` tries them."""
        start = bisect.bisect(self.keys, _hash(key))
        seen: list[str] = []
        for i in range(len(self.owners)):
            node = self.owners[(start + i) % len(self.owners)]
            if node not in seen:
                seen.append(node)
                if len(seen) == len(self.nodes):
                    break
        return seen

    def pick(self, key: str, loads: Mapping[str, int]) -> str | None:
        """The node for one more viewer of `key`, given every node's current load; None without nodes."""
        if not self.nodes:
            return None
        cap = self.cap(loads)
        for node in self.walk(key):
            if loads.get(node, 0) < cap:
                return node
        return None  # unreachable: the cap is above the average, so some node is under it
