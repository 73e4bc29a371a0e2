"""Connection caps for a public port: at most `total` connections, and at most `per_ip` from one client
address (0: no cap). A connection over a cap is refused at once with a reason; the ones already in are
not touched. Open connections are counted by service and protocol (castmesh_connections)."""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import Counter, Gauge

REFUSED = Counter("castmesh_connections_refused", "Connections refused by a cap", ["port", "cap"])
OPEN = Gauge("castmesh_connections", "Open client connections", ["service", "protocol"])


class ConnectionCaps:
    def __init__(self, name: str, total: int = 0, per_ip: int = 0) -> None:
        self.name = name
        self.total = total
        self.per_ip = per_ip
        self.open = 0
        self.by_ip: Tally[str] = Tally()

    def admit(self, ip: str, protocol: str) -> str | None:
        """Count a new `protocol` connection from `ip`; the reason it is refused instead, if it is."""
        if self.total and self.open >= self.total:
            REFUSED.labels(self.name, "total").inc()
            return f"too many connections ({self.total})"
        if self.per_ip and self.by_ip[ip] >= self.per_ip:
            REFUSED.labels(self.name, "per_ip").inc()
            return f"too many connections from {ip} ({self.per_ip})"
        self.open += 1
        self.by_ip[ip] += 1
        OPEN.labels(self.name, protocol).inc()
        return None

    def release(self, ip: str, protocol: str) -> None:
        OPEN.labels(self.name, protocol).dec()
        self.open -= 1
        self.by_ip[ip] -= 1
        if self.by_ip[ip] <= 0:
            del self.by_ip[ip]
